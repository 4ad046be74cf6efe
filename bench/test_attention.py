"""Packed multi-crop attention bench: the attention of one ViT-B/8 block over
a DINO step's crops (B images x (2 x 785 + 10 x 145 tokens), 12 heads of 64,
bf16), forward + backward, per backend, against the reference (explicit
softmax per resolution group) timed in the same run.

FLOPs: 4 L^2 D per row forward, x3 with backward -> TFLOP/s and MFU against the
bf16 peak. On a GPU records merge into bench/results/attention_<device>.json;
on the CPU (smoke) tiny shapes run and every backend is checked against math.
"""
import json

import pytest
import torch

from bench.test_model import gpu_backends, save_record
from dino_fast.benchmark import record, time_ms
from dino_fast.model.attention import packed_attention
from dino_fast.model.layout import PackedLayout

GPU = dict(batch=16, heads=12, head_dim=64, tokens=(785, 145))
SMOKE = dict(batch=2, heads=3, head_dim=16, tokens=(17, 5))


def _layout(c):
    return PackedLayout((2 * c["batch"], 10 * c["batch"]), c["tokens"])


def _step(qkv, layout, heads, scale, backend):
    def step():
        out = packed_attention(qkv, layout, heads, scale, backend)  # (T, D)
        out.backward(torch.ones_like(out))
        return out
    return step


@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash", "xformers"])
def test_attention_packed(benchmark, device, smoke, spec, backend):
    c = SMOKE if smoke else GPU
    available = ["sdpa"] if smoke else gpu_backends()
    if backend not in available:
        pytest.skip(f"{backend} does not run here (available: {available})")
    layout = _layout(c)
    D = c["heads"] * c["head_dim"]
    dtype = torch.float32 if smoke else torch.bfloat16
    qkv = torch.randn(layout.total_tokens, 3 * D, device=device, dtype=dtype, requires_grad=True)
    scale = c["head_dim"] ** -0.5

    with torch.no_grad():
        want = packed_attention(qkv, layout, c["heads"], scale, "math").float()
        got = packed_attention(qkv, layout, c["heads"], scale, backend).float()
    tol = 1e-5 if smoke else 2e-2
    assert (got - want).abs().max() <= tol * want.abs().max(), (backend, (got - want).abs().max().item())

    iters, warm = (2, 1) if smoke else (20, 5)
    ms = time_ms(_step(qkv, layout, c["heads"], scale, backend), warm, iters)
    ms_ref = time_ms(_step(qkv, layout, c["heads"], scale, "math"), warm, iters)
    flops = 3.0 * sum(r * 4.0 * n * n * D for r, n in zip(layout.rows, layout.tokens))
    rec = record(ms, spec, flops=flops, ref_ms=ms_ref, op="attention_packed", variant=backend,
                 rows=layout.rows, tokens=layout.tokens, heads=c["heads"], head_dim=c["head_dim"],
                 dtype=str(dtype), smoke=smoke, math_ms=ms_ref)
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(_step(qkv, layout, c["heads"], scale, backend), rounds=1 if smoke else 10,
                       iterations=1, warmup_rounds=0 if smoke else 1)
    if not smoke:
        save_record("attention", backend, rec)
        assert ms < ms_ref, rec
