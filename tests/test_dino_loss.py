"""Fused DINO loss (dino_fast.kernels.dino_loss) against the reference DINOLoss.

On CPU the "triton" impl runs under the Triton interpreter (tests/conftest.py).
Tolerances: fp32 inputs -- loss rel 2e-5, gradient max-abs error <= 2e-5 of
max|grad| (the reference runs in fp64 on the same values); bf16 / fp16 inputs
-- the loss against the fp64 reference on the same (rounded) values rel 2e-5
(the kernels accumulate in fp32), the gradient, returned in the input dtype,
within 1e-2 of max|grad| (bf16: 8 mantissa bits), and against the reference
run in bf16 itself rel 2e-2.
"""
import logging

import numpy as np
import pytest
import torch

from dino_fast.kernels import dino_loss as dl
from dino_fast.kernels.dino_loss import STAT_NAMES, compile_specs, dino_loss
from dino_fast.kernels.dino_loss_reference import DINOLossReference, dino_health_stats_reference
from dino_fast.losses.dino_loss import DINOLoss
from tests.conftest import requires_cuda

IMPLS = ("triton", "torch")
# warm-up 0.04 -> 0.07 over 30 epochs: epoch 0 gives 0.04, epoch 50 gives 0.07
SCHED = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, nepochs=100)


def _logits(ncrops, B, K, n_tv=2, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(ncrops * B, K, generator=g) * scale).to(dtype)
    t = (torch.randn(n_tv * B, K, generator=g) * scale).to(dtype)
    c = torch.randn(1, K, generator=g) * 0.5
    return s, t, c


def _pair(K, ncrops, impl, n_tv=2, center=None, **kw):
    fused = DINOLoss(K, ncrops, **SCHED, impl=impl, n_teacher_views=n_tv, **kw)
    ref = DINOLossReference(K, ncrops, **SCHED, n_teacher_views=n_tv).double()
    if center is not None:
        fused.center.copy_(center)
        ref.center.copy_(center.double())
    return fused, ref


def _run(module, s, t, epoch):
    s = s.detach().clone().requires_grad_()
    loss = module(s, t, epoch)
    loss.backward()
    return loss.detach(), s.grad


def _assert_grad_close(g, g_ref, rel):
    err = (g.double() - g_ref).abs().max().item()
    assert err <= rel * g_ref.abs().max().item(), (err, g_ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,K,ncrops,epoch", [
    (7, 1000, 12, 0),      # tau_t 0.04, K not a power of two
    (1, 1000, 2, 50),      # batch 1, 2 crops, tau_t 0.07
    (7, 1000, 10, 50),
    (3, 777, 3, 0),
])
def test_fp32_matches_reference(impl, B, K, ncrops, epoch):
    s, t, c = _logits(ncrops, B, K)
    fused, ref = _pair(K, ncrops, impl, center=c)
    loss, grad = _run(fused, s, t, epoch)
    loss_ref, grad_ref = _run(ref, s.double(), t.double(), epoch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    assert grad.dtype == torch.float32
    _assert_grad_close(grad, grad_ref, 2e-5)
    torch.testing.assert_close(fused.center.double(), ref.center, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_k_batch_1(impl):
    """K = 65521 (prime, near 65536): many chunks and tiles per row."""
    s, t, c = _logits(2, 1, 65521)
    fused, ref = _pair(65521, 2, impl, center=c)
    loss, grad = _run(fused, s, t, 0)
    loss_ref, grad_ref = _run(ref, s.double(), t.double(), 0)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    _assert_grad_close(grad, grad_ref, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ncrops,n_tv", [(5, 3), (4, 1)])
def test_teacher_views(impl, ncrops, n_tv):
    s, t, c = _logits(ncrops, 3, 300, n_tv=n_tv)
    fused, ref = _pair(300, ncrops, impl, n_tv=n_tv, center=c)
    loss, grad = _run(fused, s, t, 10)
    loss_ref, grad_ref = _run(ref, s.double(), t.double(), 10)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    _assert_grad_close(grad, grad_ref, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(impl, dtype):
    B, K, ncrops = 5, 1000, 12
    s, t, c = _logits(ncrops, B, K, dtype=dtype)
    fused, ref = _pair(K, ncrops, impl, center=c)
    loss, grad = _run(fused, s, t, 0)
    loss_ref, grad_ref = _run(ref, s.double(), t.double(), 0)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    _assert_grad_close(grad, grad_ref, 1e-2)
    torch.testing.assert_close(fused.center.double(), ref.center, rtol=1e-5, atol=1e-5)
    # the reference computed in the half dtype itself (what a drop-in replaces)
    ref_half = DINOLossReference(K, ncrops, **SCHED)
    ref_half.center.copy_(c)
    loss_half, _ = _run(ref_half, s, t, 0)
    torch.testing.assert_close(loss.double(), loss_half.double(), rtol=2e-2, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_center_update_over_steps(impl):
    B, K, ncrops = 4, 500, 3
    fused, ref = _pair(K, ncrops, impl)
    for step, epoch in enumerate((0, 1, 40, 99)):
        s, t, _ = _logits(ncrops, B, K, seed=step + 1)
        loss, grad = _run(fused, s, t, epoch)
        loss_ref, grad_ref = _run(ref, s.double(), t.double(), epoch)
        torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
        _assert_grad_close(grad, grad_ref, 2e-5)
        torch.testing.assert_close(fused.center.double(), ref.center, rtol=1e-6, atol=1e-6)
    assert fused.center.abs().sum() > 0 and fused.center.shape == (1, K)


@pytest.mark.parametrize("impl", IMPLS)
def test_deferred_center_update_for_accumulation(impl):
    """update_center=False keeps the centre, exposes this step's teacher column
    sum; summing two micro-batches' sums and updating once equals the
    reference's update on the whole batch."""
    B, K, ncrops = 3, 300, 4
    fused, ref = _pair(K, ncrops, impl)
    s, t, _ = _logits(ncrops, 2 * B, K, seed=5)
    halves = [(torch.cat([v[j * B:(j + 1) * B] for v in s.chunk(ncrops)]),
               torch.cat([v[j * B:(j + 1) * B] for v in t.chunk(2)])) for j in range(2)]
    before = fused.center.clone()
    total = None
    for s_j, t_j in halves:
        fused(s_j, t_j, 0, update_center=False)
        torch.testing.assert_close(fused.center, before, rtol=0, atol=0)
        torch.testing.assert_close(fused.last_teacher_sum, t_j.sum(0, keepdim=True), rtol=1e-5, atol=1e-4)
        total = fused.last_teacher_sum if total is None else total + fused.last_teacher_sum
    fused.update_center_from_sum(total, 2 * 2 * B)
    ref.update_center(t.double())
    torch.testing.assert_close(fused.center.double(), ref.center, rtol=1e-6, atol=1e-6)


def test_teacher_temp_schedule_formula():
    fused = DINOLoss(10, 2, 0.04, 0.07, 30, 100)
    sched = fused.teacher_temp_schedule
    assert isinstance(sched, np.ndarray) and sched.shape == (100,)
    for e in range(100):
        expect = 0.04 + (0.07 - 0.04) * e / 29 if e < 30 else 0.07
        assert abs(sched[e] - expect) < 1e-12, e
    np.testing.assert_array_equal(sched, DINOLossReference(10, 2, 0.04, 0.07, 30, 100).teacher_temp_schedule)


def test_state_dict_like_reference():
    fused = DINOLoss(64, 4, 0.04, 0.04, 0, 10)
    ref = DINOLossReference(64, 4, 0.04, 0.04, 0, 10)
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["center"]
    ref.center.normal_()
    fused.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fused.center, ref.center, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
def test_last_stats(impl, dtype, tol):
    B, K, ncrops = 5, 600, 4
    s, t, c = _logits(ncrops, B, K, dtype=dtype, scale=0.5)
    fused, _ = _pair(K, ncrops, impl, center=c)
    fused(s.requires_grad_(), t, 50)
    expect = dino_health_stats_reference(s, t, c, ncrops, 0.07)
    assert set(fused.last_stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        got = fused.last_stats[name]
        assert got.dim() == 0 and got.dtype == torch.float32 and got.device == s.device
        torch.testing.assert_close(got.double(), expect[name], rtol=tol, atol=tol, msg=name)
    # the entropies are non-trivial at these temperatures
    assert 0.1 < expect["student_entropy"] < np.log(K) and expect["kl"] > 0.01


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_grad_scales_with_grad_output(impl, grad_in_forward):
    s, t, c = _logits(3, 2, 300)
    grads = []
    for factor in (1.0, 3.0):
        fused, _ = _pair(300, 3, impl, center=c, grad_in_forward=grad_in_forward)
        x = s.clone().requires_grad_()
        (fused(x, t, 0) * factor).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], 3.0 * grads[0], rtol=1e-6, atol=1e-9)
    # the Liger-style path gives the same gradient as the default
    fused, _ = _pair(300, 3, impl, center=c, grad_in_forward=not grad_in_forward)
    x = s.clone().requires_grad_()
    fused(x, t, 0).backward()
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_functional(impl):
    s, t, c = _logits(3, 4, 250)
    x = s.clone().requires_grad_()
    loss, colsum, stats = dino_loss(x, t, c, ncrops=3, teacher_temp=0.05, impl=impl, return_stats=True)
    ref = DINOLossReference(250, 3, 0.05, 0.05, 0, 1).double()
    ref.center.copy_(c.double())
    loss_ref, grad_ref = _run(ref, s.double(), t.double(), 0)
    loss.backward()
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    _assert_grad_close(x.grad, grad_ref, 2e-5)
    assert colsum.shape == (1, 250) and colsum.dtype == torch.float32
    torch.testing.assert_close(colsum.double(), t.double().sum(0, keepdim=True), rtol=1e-6, atol=1e-5)
    assert set(stats) == set(STAT_NAMES)
    assert t.grad is None and not colsum.requires_grad


def test_no_grad_forward_matches():
    s, t, c = _logits(4, 3, 200)
    fused, ref = _pair(200, 4, "triton", center=c)
    with torch.no_grad():
        loss = fused(s, t, 3)
    torch.testing.assert_close(loss.double(), ref(s.double(), t.double(), 3), rtol=2e-5, atol=0)


def test_auto_picks_torch_on_cpu_and_logs_once(caplog):
    s, t, _ = _logits(2, 2, 50)
    fused = DINOLoss(50, 2, 0.04, 0.04, 0, 1)
    with caplog.at_level(logging.INFO, logger="dino_fast.losses.dino_loss"):
        fused(s, t, 0)
        fused(s, t, 0)
    msgs = [r.getMessage() for r in caplog.records if "impl=" in r.getMessage()]
    assert msgs == ["DINOLoss: impl=torch (requested auto)"]


@pytest.mark.parametrize("args,match", [
    (dict(s=(7, 50)), "not a positive multiple of ncrops"),
    (dict(t=(3, 50)), "teacher_output must be"),
    (dict(c=(1, 49)), "center must have out_dim"),
    (dict(ncrops=1, n_tv=1), "need ncrops >= 2"),
])
def test_bad_input_errors(args, match):
    s = torch.randn(*args.get("s", (6, 50)))
    t = torch.randn(*args.get("t", (4, 50)))
    c = torch.zeros(*args.get("c", (1, 50)))
    with pytest.raises(ValueError, match=match):
        dino_loss(s, t, c, ncrops=args.get("ncrops", 3), teacher_temp=0.04,
                  n_teacher_views=args.get("n_tv", 2), impl="torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        DINOLoss(50, 3, 0.04, 0.04, 0, 1, impl="cuda")


def test_compile_specs_cover_launcher_configs():
    specs = compile_specs()
    names = {sp.name for sp in specs}
    assert names == {"dino_loss_teacher_stats", "dino_loss_teacher_finish", "dino_loss_student_fwd",
                     "dino_loss_student_grad", "dino_loss_student_finish", "dino_loss_finish"}
    for dtype, dname in dl._DTYPES.items():
        have = {(sp.name, tuple(sorted(sp.constexprs.items())), sp.num_warps, sp.num_stages)
                for sp in specs if sp.dtype == dname}
        for n_tv in (1, 2, 3, 4):
            for ncrops in range(max(2, n_tv), n_tv + 33):
                plan = dl._plan(64, 65536, ncrops, n_tv, 132)
                cfg = plan["cfg_s"]
                key = tuple(sorted((k, cfg[k]) for k in ("BLOCK_T", "BLOCK_L", "BLOCK_K")))
                for kern in ("dino_loss_student_fwd", "dino_loss_student_grad"):
                    assert (kern, key, cfg["num_warps"], cfg["num_stages"]) in have, (dname, ncrops, n_tv)
        for sp in specs:
            if sp.dtype == dname:
                assert set(sp.signature) == set(sp.fn.arg_names), sp.name
                assert all(sp.signature[k] == "constexpr" for k in sp.constexprs)
    # the default problem: 64 batch x 16 chunks for the student kernels at B=64, K=65536
    fwd12 = [sp for sp in specs if sp.name == "dino_loss_student_fwd" and sp.dtype == "bf16"
             and sp.constexprs["BLOCK_L"] == 16 and sp.constexprs["BLOCK_T"] == 2]
    assert fwd12 and fwd12[0].problem["grid"] == 64 * dl._plan(64, 65536, 12, 2, 132)["nch_s"]


def test_chunking_covers_k():
    for K in (1, 31, 1000, 4097, 65521, 65536, 1 << 20):
        for rows in (1, 64, 4096):
            chunk, nch = dl._chunking(K, rows, 128, 132)
            assert chunk % 128 == 0 and 1 <= nch <= dl._MAX_CHUNKS
            assert (nch - 1) * chunk < K <= nch * chunk


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    B, K, ncrops = 16, 65536, 12
    s, t, c = (x.cuda() for x in _logits(ncrops, B, K, dtype=dtype))
    fused, ref = _pair(K, ncrops, "triton", center=c)
    fused, ref = fused.cuda(), ref.cuda()
    loss, grad = _run(fused, s, t, 0)
    loss_ref, grad_ref = _run(ref, s.double(), t.double(), 0)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    _assert_grad_close(grad, grad_ref, 2e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(fused.center.double(), ref.center, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_cuda_int64_offsets():
    """Student rows * K past 2^31 elements (bf16, ~4.3 GB): the last rows'
    gradient against the formula computed for those rows alone."""
    B, K, ncrops = 2731, 65536, 12
    assert ncrops * B * K > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(ncrops * B, K, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(2 * B, K, device="cuda", generator=g, dtype=torch.bfloat16)
    c = torch.zeros(1, K, device="cuda")
    loss, _ = dino_loss(s, t, c, ncrops=ncrops, teacher_temp=0.04, impl="triton")
    loss.backward()
    b = B - 1                                        # last batch index: rows v*B + b reach the end
    q = torch.softmax(t.float()[[b, B + b]] / 0.04, -1)               # (2, K)
    p = torch.softmax(s.detach().float()[b::B] / 0.1, -1)             # (ncrops, K)
    m = torch.full((ncrops, 1), 2.0, device="cuda")
    m[:2] = 1.0
    Qv = q.sum(0, keepdim=True).repeat(ncrops, 1)
    Qv[:2] -= q
    expect = (m * p - Qv) / ((2 * ncrops - 2) * B * 0.1)
    _assert_grad_close(s.grad[b::B], expect.double(), 1e-2)


_AOT_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from dino_fast.kernels.dino_loss import compile_specs
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = []
for sp in compile_specs():
    # the configurations the launcher picks at ncrops 10 / 12 with 2 teacher views, bf16, + the finishers
    if sp.dtype != "bf16" and "finish" not in sp.name:
        continue
    if "BLOCK_L" in sp.constexprs and (sp.constexprs["BLOCK_T"], sp.constexprs["BLOCK_L"]) not in ((2, 8), (2, 16)):
        continue
    k = triton.compile(ASTSource(sp.fn, sp.signature, sp.constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": sp.num_warps, "num_stages": sp.num_stages})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        open(ptx, "w").write(k.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".o"], capture_output=True, text=True)
    out.append(dict(name=sp.name, config=sp.config, rc=r.returncode,
                    regs=[int(x) for x in re.findall(r"Used (\d+) registers", r.stderr)],
                    spills=[int(x) for x in re.findall(r"(\d+) bytes spill stores", r.stderr)]))
print(json.dumps(out))
"""


def test_aot_compile_sm90_no_spills():
    """The launcher's default configurations compile ahead of time for sm_90
    (triton.compile + the bundled ptxas) with no register spills. Runs in a
    process without TRITON_INTERPRET (the interpreter replaces @triton.jit)."""
    import json
    import os
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert {x["name"] for x in results} == {"dino_loss_teacher_stats", "dino_loss_student_fwd", "dino_loss_student_grad",
                                            "dino_loss_teacher_finish", "dino_loss_student_finish", "dino_loss_finish"}
    for x in results:
        assert x["rc"] == 0 and x["regs"] and x["spills"] == [0], x
