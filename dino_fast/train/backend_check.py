"""The backend flags of `dino-fast train` checked with the config (config.validate raises the
problem as a ConfigError), so a misspelt name is one line naming the flag before the run writes
anything (not a ValueError from
deep inside the model, loss or loader build after config.json): --attention, --loss_impl,
--ema_impl and --pipeline take one of their module's names, and --pipeline dali needs DALI.
Whether a named attention backend runs on the device is decided at model build."""
from __future__ import annotations


def backend_names() -> dict[str, tuple[str, ...]]:
    """flag -> accepted names, from the modules that implement them."""
    from dino_fast.kernels.dino_loss import IMPLS as LOSS_IMPLS
    from dino_fast.kernels.ema import IMPLS as EMA_IMPLS
    from dino_fast.model.attention import BACKENDS as ATTENTION
    from dino_fast.pipelines.loader import BACKENDS as PIPELINES
    return {"attention": ("auto",) + tuple(ATTENTION), "loss_impl": tuple(LOSS_IMPLS),
            "ema_impl": tuple(EMA_IMPLS), "pipeline": tuple(PIPELINES)}


def backend_problem(cfg) -> str | None:
    """What is wrong with cfg's backend flags (one line), or None."""
    for flag, names in backend_names().items():
        if getattr(cfg, flag) not in names:
            return f"--{flag} {getattr(cfg, flag)!r} is not one of: {', '.join(names)}"
    if cfg.pipeline == "dali":
        from dino_fast.pipelines.loader import dali_available
        if not dali_available():
            return ("--pipeline dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the build for your "
                    "CUDA), or use --pipeline torch (or auto)")
    return None
