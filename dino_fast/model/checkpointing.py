"""Activation checkpointing of one transformer block: off, full or selective.

- "full":      the block keeps only its input; the whole block is recomputed in the backward
               (torch.utils.checkpoint, non-reentrant).
- "selective": the outputs of the matmuls (qkv, proj, fc1/fc2 or w12/w1/w2/w3: aten mm / addmm /
               bmm / baddbmm, and FP8 _scaled_mm) and of the attention kernels (every aten / xformers
               / varlen op whose name says attention) are saved; the cheap element-wise ops
               (LayerNorm, GELU / SiLU, LayerScale, RoPE rotation, residual adds, the gathers of
               the packed layout) are recomputed. torch's selective checkpoint policy
               (create_selective_checkpoint_contexts), as DINOv3's trainer does
               (dinov3/fsdp/ac_compile_parallelize.py `_save_list`). Costs the element-wise
               recompute only (no GEMM runs twice); saves ~1/3 of the activations of a block.
- False:       nothing.

`checkpoint_mode` turns the config's value (bool, or a mode string) into one of the three.
"""
from __future__ import annotations

from functools import cache


@cache
def _torch_checkpoint():
    """torch.utils.checkpoint, imported on first use: the config and `--help` read the modes
    (checkpoint_mode) without importing torch."""
    import torch.utils.checkpoint
    return torch.utils.checkpoint

MODES = (False, "full", "selective")
_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "matmul", "linear", "_int_mm")


def checkpoint_mode(value) -> bool | str:
    """False | "full" | "selective" from a bool (True = full, as the old flag) or a word."""
    from dino_fast.flags import mode_value
    return mode_value(value, "--activation_checkpointing", ("full", "selective"), "full")


def is_saved_op(func) -> bool:
    """Selective policy: the op's output is kept (a matmul or an attention kernel)."""
    schema = getattr(func, "_schema", None)
    name = schema.name if schema is not None else str(func)
    base = name.split("::")[-1]
    return base in _MATMULS or "attention" in base or "attn" in base


def _policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    policy = _torch_checkpoint().CheckpointPolicy
    return policy.MUST_SAVE if is_saved_op(func) else policy.PREFER_RECOMPUTE


def selective_context():
    """The (forward, recompute) context pair of the selective policy."""
    return _torch_checkpoint().create_selective_checkpoint_contexts(_policy)


def run_checkpointed(mode, fn, *args):
    """fn(*args) under activation checkpointing `mode` (False: plain call)."""
    if not mode:
        return fn(*args)
    if mode == "selective":
        return _torch_checkpoint().checkpoint(fn, *args, use_reentrant=False, context_fn=selective_context)
    return _torch_checkpoint().checkpoint(fn, *args, use_reentrant=False)
