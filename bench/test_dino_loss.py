"""DINO loss bench: fused (Triton) forward + backward vs the reference DINOLoss,
timed in the same run, B = 64 per GPU, K = 65536, ncrops 10 and 12, fp32 and bf16.

Traffic: the bytes the kernels really move in forward + backward
(dino_fast.benchmark.cases.dino_loss_traffic: student logits read twice and
their gradient written once, teacher logits read three times, in the input
dtype; the record names this floor). GB/s and the fraction of HBM peak are
against that. Also reported: the reference's time
(ratio), peak extra memory of both (and the ratio), the torch impl, the
Liger-style variant (gradient written in the forward) and the forward alone.
On the CPU (smoke) tiny shapes run and only correctness is asserted; on a GPU
the record goes to bench/results/dino_loss_<device>.json.
"""
import json

import pytest
import torch

from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark import peak_extra_memory, record, time_ms
from dino_fast.benchmark.cases import dino_loss_traffic
from dino_fast.kernels import dino_loss as dl
from dino_fast.losses.dino_loss import DINOLoss
from dino_fast.kernels.dino_loss_reference import DINOLossReference

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}




def _sweep(make, device, s, t, iters):
    """Fused fwd+bwd time for other tile sizes / warps of the student kernels
    (data for choosing dl._TILE_ELEMS and dl._STUDENT_WARPS on this device)."""
    saved = dl._TILE_ELEMS, dl._STUDENT_WARPS
    out = {}
    try:
        for tile in (2048, 3072, 6144):
            for warps in (4, 8, 16):
                dl._TILE_ELEMS, dl._STUDENT_WARPS = tile, warps
                out[f"tile{tile}_warps{warps}"] = time_ms(_step(DINOLoss(**make, impl="triton").to(device), s, t),
                                                          1, iters)
    finally:
        dl._TILE_ELEMS, dl._STUDENT_WARPS = saved
    return out


def _step(loss_fn, s, t):
    def run():
        s.grad = None
        loss_fn(s, t, 0).backward()
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ncrops", [10, 12])
def test_dino_loss(benchmark, device, smoke, spec, ncrops, dtype):
    B, K = (2, 300) if smoke else (64, 65536)
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(ncrops * B, K, generator=g, device=device) * 2).to(dtype).requires_grad_()
    t = (torch.randn(2 * B, K, generator=g, device=device) * 2).to(dtype)
    make = dict(out_dim=K, ncrops=ncrops, warmup_teacher_temp=0.04, teacher_temp=0.04,
                warmup_teacher_temp_epochs=0, nepochs=1)
    fused = DINOLoss(**make, impl="triton").to(device)
    ref = DINOLossReference(**make).to(device)

    # correctness first: fused vs the reference in fp64 (CPU) / fp32 (GPU) on the same
    # values, two steps (the second with the updated center)
    exact = torch.float64 if smoke else torch.float32
    ref_exact = DINOLossReference(**make).to(device=device, dtype=exact)
    s_exact = s.detach().to(exact).requires_grad_()
    rtol = 2e-5 if smoke else 1e-4
    for _ in range(2):
        s.grad = s_exact.grad = None
        loss = fused(s, t, 0)
        loss.backward()
        loss_exact = ref_exact(s_exact, t.to(exact), 0)
        loss_exact.backward()
        torch.testing.assert_close(loss.detach().to(exact), loss_exact.detach(), rtol=rtol, atol=0)
        err = (s.grad.to(exact) - s_exact.grad).abs().max() / s_exact.grad.abs().max()
        assert err <= (2e-5 if dtype == torch.float32 else 1e-2), float(err)
    del ref_exact, s_exact, loss_exact

    warm, iters = (0, 1) if smoke else (1, 20)       # smoke: the timings mean nothing, keep it short
    ms = time_ms(_step(fused, s, t), warm, iters)
    ref_ms = time_ms(_step(ref, s, t), warm, iters)
    extra = {}
    if not smoke:
        extra["torch_impl_ms"] = time_ms(_step(DINOLoss(**make, impl="torch").to(device), s, t), 1, iters)
        extra["grad_in_forward_ms"] = time_ms(
            _step(DINOLoss(**make, impl="triton", grad_in_forward=True).to(device), s, t), 1, iters)
        with torch.no_grad():
            extra["forward_only_ms"] = time_ms(lambda: fused(s, t, 0), 1, iters)
        extra["sweep_ms"] = _sweep(make, device, s, t, iters)
    s.grad = None
    mem = peak_extra_memory(_step(fused, s, t))
    s.grad = None
    ref_mem = peak_extra_memory(_step(ref, s, t))
    s.grad = None

    rec = record(ms, spec, **dino_loss_traffic(B, K, ncrops, elem_bytes=s.element_size()), ref_ms=ref_ms,
                 peak_mem=mem, op="dino_loss",
                 variant=f"{NAMES[dtype]}_ncrops{ncrops}", B=B, K=K, ncrops=ncrops, smoke=smoke,
                 ref_peak_extra_mem_bytes=ref_mem,
                 mem_ratio=(ref_mem / mem) if mem else None, **extra)
    rec["goals"] = {"speedup>=10": rec["speedup"] >= 10,
                    "mem_ratio>=5": bool(rec["mem_ratio"] and rec["mem_ratio"] >= 5),
                    "frac_hbm>=0.6": rec["frac_hbm"] >= 0.6}
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(_step(fused, s, t), rounds=1 if smoke else 10, iterations=1,
                       warmup_rounds=0 if smoke else 1)
    if not smoke:
        save_record("dino_loss", rec["variant"], rec)
        assert ms < ref_ms, rec
