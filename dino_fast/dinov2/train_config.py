"""Checks of the dinov2 method's TrainConfig fields (the block headed `dinov2train`
in dino_fast/train/config.py): errors that name the flag and the fix."""
from __future__ import annotations

METHODS = ("dino", "dinov2")
CENTERINGS = ("softmax", "sinkhorn_knopp")
LR_SCALINGS = ("linear_wrt_256", "sqrt_wrt_1024")


def validate_dinov2(cfg) -> None:
    from dino_fast.errors import ConfigError
    from dino_fast.model.registry import VIT_ARCHS
    for name, options in (("method", METHODS), ("centering", CENTERINGS), ("lr_scaling", LR_SCALINGS)):
        if getattr(cfg, name) not in options:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r} is not one of: {', '.join(options)}")
    try:
        lo, hi = (float(v) for v in cfg.mask_ratio_min_max)
    except (TypeError, ValueError):
        raise ConfigError(f"--mask_ratio_min_max needs two numbers 'min max' (e.g. 0.1 0.5), got "
                          f"{cfg.mask_ratio_min_max!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"--mask_ratio_min_max {lo} {hi}: needs 0 <= min <= max <= 1 (shares of the patches)")
    cfg.mask_ratio_min_max = (lo, hi)
    if not 0.0 <= cfg.mask_sample_probability <= 1.0:
        raise ConfigError(f"--mask_sample_probability {cfg.mask_sample_probability} must lie in [0, 1]")
    for name in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight", "gram_loss_weight",
                 "gram_weight_warmup_epochs", "gram_weight_ramp_epochs", "gram_it_first_update", "gram_max_updates",
                 "gram_teacher_size"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("ibot_out_dim", "ibot_head_hidden_dim", "ibot_head_bottleneck_dim", "gram_update_frequency"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if not 0.0 < cfg.layerwise_decay <= 1.0:
        raise ConfigError(f"--layerwise_decay {cfg.layerwise_decay} must lie in (0, 1] (1: no decay; DINOv2: 0.9)")
    if cfg.patch_embed_lr_mult <= 0:
        raise ConfigError(f"--patch_embed_lr_mult must be positive, got {cfg.patch_embed_lr_mult}")
    if cfg.method != "dinov2":
        return
    if not cfg.arch in VIT_ARCHS:
        raise ConfigError(f"--method dinov2 needs a ViT (masked patch tokens); --arch {cfg.arch} is a convnet")
    if cfg.grad_accum_steps != 1:
        raise ConfigError("--method dinov2 runs one micro-batch per step: use --grad_accum_steps 1")
    if cfg.optimizer != "adamw":
        raise ConfigError(f"--method dinov2 trains with AdamW (DINOv2 / DINOv3): --optimizer {cfg.optimizer} "
                          "is not supported there")
    if cfg.gram_weight_warmup_epochs + cfg.gram_weight_ramp_epochs > cfg.epochs:
        raise ConfigError(f"--gram_weight_warmup_epochs + --gram_weight_ramp_epochs "
                          f"({cfg.gram_weight_warmup_epochs + cfg.gram_weight_ramp_epochs}) exceed --epochs "
                          f"({cfg.epochs})")
    if cfg.gram_teacher_size and cfg.gram_teacher_size % cfg.patch_size:
        raise ConfigError(f"--gram_teacher_size {cfg.gram_teacher_size} is not a multiple of --patch_size "
                          f"{cfg.patch_size}")


def scaled_lr(cfg, batch_total: int) -> float:
    """--lr for the total batch: lr * batch / 256 (DINO) or lr * sqrt(batch / 1024) (DINOv2's sqrt_wrt_1024)."""
    if cfg.lr_scaling == "sqrt_wrt_1024":
        return cfg.lr * (batch_total / 1024.0) ** 0.5
    return cfg.lr * batch_total / 256.0
