"""Teacher EMA bench: ViT-B/8 + DINO head (out_dim 65536, 109 M parameters in
158 tensors, real shapes), one-launch Triton kernel vs `torch._foreach_lerp_`
vs the reference's per-parameter loop, timed in the same run.

Bytes moved (the floor, dino_fast.benchmark.cases.ema_traffic): read teacher +
read student + write teacher. On a
GPU the record goes to bench/results/ema_<device>.json; on the CPU (smoke) a
tiny ViT of the same layout runs and only correctness is asserted.
"""
import json

import pytest
import torch

from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark import record, time_ms
from dino_fast.benchmark.cases import ema_traffic
from dino_fast.kernels.ema import ema_update_, ema_update_reference_, vit_b8_dino_param_shapes
from tests.test_ema import _assert_close_to_exact

SMOKE_SHAPES = dict(out_dim=1000, depth=1, embed_dim=48, patch_size=16, img_size=32,
                    hidden_dim=64, bottleneck_dim=16)
VARIANTS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
            (torch.float32, torch.bfloat16)]


def _params(shapes, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=g, device=device).to(dtype) for s in shapes]




@pytest.mark.parametrize("t_dtype,s_dtype", VARIANTS, ids=["fp32", "bf16", "fp32<-bf16"])
def test_ema(benchmark, device, smoke, spec, t_dtype, s_dtype):
    shapes = list(vit_b8_dino_param_shapes(**(SMOKE_SHAPES if smoke else {})).values())
    teacher = _params(shapes, t_dtype, device, 0)
    student = _params(shapes, s_dtype, device, 1)
    numel = sum(t.numel() for t in teacher)
    momentum = torch.tensor(0.996, dtype=torch.float64, device=device)  # a device schedule entry

    # correctness first, on fresh copies: every impl against the reference loop's formula
    before = [t.clone() for t in teacher]
    for impl in ("triton", "foreach"):
        out = [t.clone() for t in teacher]
        ema_update_(out, student, 0.996, impl=impl)
        for o, t0, s in zip(out, before, student):
            _assert_close_to_exact(o.cpu(), t0.cpu(), s.cpu(), 0.996, impl)
    del before, out

    iters = 2 if smoke else 20
    ms = {
        "triton": time_ms(lambda: ema_update_(teacher, student, 0.996, impl="triton"), 1, iters),
        "triton_tensor_m": time_ms(lambda: ema_update_(teacher, student, momentum, impl="triton"),
                                   1, iters),
        "foreach": time_ms(lambda: ema_update_(teacher, student, 0.996, impl="foreach"), 1, iters),
        "loop": time_ms(lambda: ema_update_reference_(teacher, student, 0.996), 1, iters),
    }
    variant = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    rec = record(ms["triton"], spec, **ema_traffic(teacher, student), ref_ms=ms["loop"],
                 op="ema", variant=f"{variant[t_dtype]}<-{variant[s_dtype]}", params=numel,
                 tensors=len(teacher), smoke=smoke, ms_tensor_momentum=ms["triton_tensor_m"],
                 foreach_ms=ms["foreach"], loop_ms=ms["loop"],
                 speedup_vs_foreach=ms["foreach"] / ms["triton"])
    rec["goals"] = {"frac_hbm>=0.8": rec["frac_hbm"] >= 0.8,
                    "faster_than_foreach": ms["triton"] < ms["foreach"],
                    "speedup_vs_loop>=20": rec["speedup"] >= 20}
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(lambda: ema_update_(teacher, student, momentum, impl="triton"),
                       rounds=1 if smoke else 10, iterations=1, warmup_rounds=0 if smoke else 1)
    if not smoke:
        save_record("ema", rec["variant"], rec)
        assert ms["triton"] < ms["loop"], rec
