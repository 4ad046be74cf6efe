"""Mixed precision: one numerics for one device and for FSDP2 over N.

bf16 and fp16 run under `torch.autocast` on one device and under FSDP2 alike, with
fp32 master weights, so GEMMs and attention take the low-precision path while the
ops autocast keeps in fp32 on CUDA (LayerNorm, softmax, the head's L2 norm, the
log-sum-exps) stay fp32, and the fp32 parameters that never enter a GEMM (CLS
token, position embeddings, LayerNorm, LayerScale, the head's weight norm) are
used as they are. FSDP2 therefore all-gathers the fp32 parameters
(`MixedPrecisionPolicy(param_dtype=None, reduce_dtype=fp32)`) and leaves the
bf16 cast of the GEMM weights to autocast, which rounds them exactly as on one
device. A `param_dtype=bf16` policy without autocast (what this module replaced)
rounds every parameter and runs LayerNorm, GELU, the residual stream, the L2
normalisation and the weight norm in bf16 on N GPUs only; with autocast on top
it still moves the residual stream to bf16 (bf16 CLS token and position
embeddings). The price of the fp32 all-gather: 2x the gather bytes; for ViT-B/8 +
head (109 M parameters; ~300 M gathered per step: student forward, the blocks again
in the backward, teacher forward) about 0.6 GB more per GPU per step, ~2 ms over
NVLink against a ~260 ms step, overlapped with compute.

On the CPU reduced precision applies only with `cpu_autocast=True` (tests of the
GPU path on a machine without one); note that CPU autocast keeps LayerNorm and
softmax in their input dtype, where CUDA autocast computes them in fp32.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(precision: str, device: torch.device, use_fsdp: bool, cpu_autocast: bool = False):
    """(FSDP2 MixedPrecisionPolicy or None, autocast context factory, GradScaler or None)."""
    low = precision in DTYPES and (device.type == "cuda" or cpu_autocast)
    policy = None
    if use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        # fp32 parameters all-gathered and used as on one device; gradients reduced in fp32
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    if not low:
        return policy, contextlib.nullcontext, None
    dtype, kind = DTYPES[precision], device.type

    def autocast():
        return torch.autocast(kind, dtype=dtype)
    scaler = torch.amp.GradScaler(kind) if precision == "fp16" else None   # the reference's use_fp16
    return policy, autocast, scaler


__all__ = ["mixed_precision", "DTYPES"]
