"""Teacher EMA (kernels/ema.py) against the reference's per-parameter loop and
an exact float64 formula; the momentum schedule against the cosine formula.

Tolerances (error against the exact float64 value of t·λ + s·(1−λ) computed
from the very same input values, per element, with a = |t·λ| + |s·(1−λ)|):
  * fp32 teacher, fp32 student: ≤ 4·2⁻²⁴·a (a few fp32 roundings; the GPU
    contracts to an FMA, the interpreter does not). On the CPU the Triton
    path is also bit-identical to the loop.
  * any bf16 operand, Triton: ≤ 2⁻⁷·|result| + 4·2⁻²⁴·a, one bf16 ulp (math
    in fp32, one rounding to bf16; the Triton interpreter truncates fp32→bf16,
    the GPU rounds to nearest even).
  * any bf16 operand, loop / foreach: ≤ 2⁻⁷·a (they round t·λ and (1−λ)·s to
    bf16 before adding, as the reference does).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dino_fast
from dino_fast.kernels import ema
from dino_fast.kernels.ema import (compile_specs, ema_update_, ema_update_reference_,
                                   vit_b8_dino_param_shapes)
from dino_fast.schedules import MomentumSchedule

# 1 element, primes, block edges (BLOCK = 4096), > 2^20 elements in total.
ODD_SIZES = [1, 2, 3, 13, 127, 4095, 4096, 4097, 65537, (1 << 20) + 7]
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
          (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
IMPLS = ["triton", "foreach", "loop"]


def _make(sizes, t_dtype, s_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(n, generator=g).to(t_dtype) for n in sizes]
    student = [torch.randn(n, generator=g).to(s_dtype) for n in sizes]
    return teacher, student


def _exact(t, s, m):
    """float64 t·λ + s·(1−λ) and the magnitude a = |t·λ| + |s·(1−λ)|."""
    td, sd = t.double(), s.double()
    return td * m + sd * (1 - m), (td * m).abs() + (sd * (1 - m)).abs()


def _assert_close_to_exact(out, t0, s, m, impl):
    exact, mag = _exact(t0, s, m)
    if out.dtype == torch.float32 and s.dtype == torch.float32:
        bound = 4 * 2.0 ** -24 * mag
    elif impl == "triton":
        bound = 2.0 ** -7 * exact.abs() + 4 * 2.0 ** -24 * mag
    else:
        bound = 2.0 ** -7 * mag
    err = (out.double() - exact).abs()
    bad = err > bound + 1e-30
    assert not bad.any(), (f"{impl} {out.dtype}<-{s.dtype} m={m}: {int(bad.sum())} of {out.numel()} "
                           f"elements off, worst err {float((err - bound).max()):.3g} over the bound")


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t_dtype,s_dtype", DTYPES)
def test_odd_sizes_against_exact(impl, t_dtype, s_dtype):
    teacher, student = _make(ODD_SIZES, t_dtype, s_dtype)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 0.996, impl=impl)
    for out, t0, s in zip(teacher, before, student):
        assert out.dtype == t_dtype and out.shape == t0.shape
        _assert_close_to_exact(out, t0, s, 0.996, impl)


@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_triton_fp32_matches_reference_loop(momentum_kind):
    """fp32: the kernel equals `param_k.mul_(m).add_((1 - m) * param_q)` (bit
    for bit on the CPU interpreter; within 1 ulp where the GPU fuses an FMA)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = 0.9963 if momentum_kind == "float" else torch.tensor(0.9963, device=device)
    teacher, student = _make(ODD_SIZES, torch.float32, torch.float32)
    teacher, student = [t.to(device) for t in teacher], [s.to(device) for s in student]
    ref = [t.clone() for t in teacher]
    ema_update_reference_(ref, student, m)
    ema_update_(teacher, student, m, impl="triton")
    for out, r in zip(teacher, ref):
        if device == "cpu":
            assert torch.equal(out, r)
        else:
            torch.testing.assert_close(out, r, rtol=2.0 ** -23, atol=1e-30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t_dtype,s_dtype", DTYPES)
def test_momentum_one_keeps_teacher_bit_exact(impl, t_dtype, s_dtype):
    teacher, student = _make([1, 4097, 13], t_dtype, s_dtype)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 1.0, impl=impl)
    for out, t0 in zip(teacher, before):
        assert torch.equal(out, t0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t_dtype,s_dtype", DTYPES)
def test_momentum_zero_copies_student(impl, t_dtype, s_dtype):
    teacher, student = _make([1, 4097, 13], t_dtype, s_dtype)
    ema_update_(teacher, student, 0.0, impl=impl)
    for out, s in zip(teacher, student):
        if t_dtype == torch.bfloat16 and s_dtype == torch.float32 and impl == "triton":
            # one bf16 rounding of s: nearest-even on GPU, truncation in the interpreter
            torch.testing.assert_close(out.float(), s, rtol=2.0 ** -7, atol=0)
        else:
            assert torch.equal(out, s.to(t_dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t_dtype,s_dtype", [DTYPES[0], DTYPES[1]])
def test_tensor_momentum_equals_float_momentum(impl, t_dtype, s_dtype):
    """A 0-dim tensor momentum (read on the device) gives the float result; a
    float64 tensor is accepted too."""
    for m_tensor in (torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64)):
        teacher, student = _make([5, 4099], t_dtype, s_dtype)
        before, expect = [t.clone() for t in teacher], [t.clone() for t in teacher]
        ema_update_(expect, student, 0.75, impl=impl)     # 0.75: 1-λ exact either way
        ema_update_(teacher, student, m_tensor, impl=impl)
        for out, e, t0, s in zip(teacher, expect, before, student):
            if impl == "foreach":   # float: _foreach_lerp_; tensor: _foreach_mul_ + _foreach_add_
                _assert_close_to_exact(out, t0, s, 0.75, impl)
                _assert_close_to_exact(e, t0, s, 0.75, impl)
            else:
                assert torch.equal(out, e)


@pytest.mark.parametrize("m", [0.996, 0.99999, 1 - 1e-9])
def test_float64_tensor_momentum_is_bit_identical_to_float(m):
    """λ near 1: the kernel forms 1−λ in fp64 like the reference's Python
    float, so a fp64 device schedule gives the float result bit for bit."""
    teacher, student = _make([4099, 5], torch.float32, torch.float32)
    expect = [t.clone() for t in teacher]
    ema_update_reference_(expect, student, m)
    ema_update_(teacher, student, torch.tensor(m, dtype=torch.float64), impl="triton")
    for out, e in zip(teacher, expect):
        assert torch.equal(out, e)


def test_repeated_steps_follow_schedule_and_reuse_table(monkeypatch):
    """Five steps with schedule momenta (tensor, as the training loop passes
    them) match the loop; the block table is built once and reused."""
    builds = []
    real_build = ema._build_groups
    monkeypatch.setattr(ema, "_build_groups", lambda *a: builds.append(1) or real_build(*a))
    ema._TABLE_CACHE.clear()
    schedule = MomentumSchedule(0.996, epochs=2, niter_per_ep=3).as_tensor()
    teacher, student = _make([3, 4096, 10007], torch.float32, torch.float32)
    ref = [t.clone() for t in teacher]
    for it in range(5):
        ema_update_reference_(ref, student, schedule[it])
        ema_update_(teacher, student, schedule[it], impl="triton")
        student = [s.add_(0.01 * (it + 1)) for s in student]   # in place: same storage
    assert len(builds) == 1
    for out, r in zip(teacher, ref):
        assert torch.equal(out, r)
    # new storage for one student tensor -> the table is rebuilt, result still right
    student[1] = student[1].clone()
    ema_update_reference_(ref, student, 0.5)
    ema_update_(teacher, student, 0.5, impl="triton")
    assert len(builds) == 2
    for out, r in zip(teacher, ref):
        assert torch.equal(out, r)


class _LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_launch_per_dtype_group(monkeypatch):
    counter = _LaunchCounter(ema._ema_kernel)
    monkeypatch.setattr(ema, "_ema_kernel", counter)
    teacher, student = _make([1, 4097, 13, 8192], torch.float32, torch.float32)
    ema_update_(teacher, student, 0.9, impl="triton")
    assert counter.grids == [(1 + 2 + 1 + 2,)]      # blocks of 4096: one launch
    counter.grids.clear()
    t2, s2 = _make([5, 7], torch.float32, torch.bfloat16)
    ema_update_(teacher + t2, student + s2, 0.9, impl="triton")
    assert sorted(counter.grids) == [(2,), (6,)]    # (fp32, fp32) and (fp32, bf16) groups


def test_unaligned_and_noncontiguous_tensors():
    """A view at an odd offset runs the unhinted kernel variant; a transposed
    view goes through the foreach path; both are right."""
    g = torch.Generator().manual_seed(1)
    base_t, base_s = torch.randn(9000, generator=g), torch.randn(9010, generator=g)
    mat_t, mat_s = torch.randn(37, 41, generator=g), torch.randn(37, 41, generator=g)
    teacher = [base_t[1:], mat_t.t(), torch.randn(300, generator=g)]
    student = [base_s[3:3 + 8999], mat_s.t(), torch.randn(300, generator=g)]
    assert teacher[0].data_ptr() % 16 != 0 and not teacher[1].is_contiguous()
    before = [t.clone() for t in teacher]
    ref = [t.clone() for t in teacher]
    ema_update_reference_(ref, student, 0.9)
    ema_update_(teacher, student, 0.9, impl="triton")
    for out, t0, s in zip(teacher, before, student):
        _assert_close_to_exact(out, t0, s, 0.9, "triton")
    assert torch.equal(teacher[0], ref[0]) and torch.equal(teacher[2], ref[2])  # kernel path


def test_modules_and_empty_tensors():
    torch.manual_seed(3)
    teacher = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    student = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    ref = [p.detach().clone() for p in teacher.parameters()]
    ema_update_reference_(ref, list(student.parameters()), 0.9)
    ema_update_(teacher, student, 0.9, impl="triton")
    for p, r in zip(teacher.parameters(), ref):
        assert torch.equal(p.detach(), r) and p.requires_grad
    ema_update_([torch.empty(0)], [torch.empty(0)], 0.5, impl="triton")   # no-op, no launch
    ema_update_([], [], 0.5)


def test_auto_is_foreach_on_cpu(monkeypatch):
    monkeypatch.setattr(ema, "_ema_triton_", lambda *a: pytest.fail("auto used Triton on CPU"))
    teacher, student = _make([10, 3], torch.float32, torch.float32)
    ref = [t.clone() for t in teacher]
    ema_update_reference_(ref, student, 0.9)
    ema_update_(teacher, student, 0.9)
    for out, r in zip(teacher, ref):
        torch.testing.assert_close(out, r, rtol=4 * 2.0 ** -24, atol=1e-7)


def test_public_export():
    assert dino_fast.ema_update_ is ema_update_


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t_dtype,s_dtype", DTYPES)
def test_cuda_against_exact(t_dtype, s_dtype):
    teacher, student = _make(ODD_SIZES, t_dtype, s_dtype)
    teacher, student = [t.cuda() for t in teacher], [s.cuda() for s in student]
    before = [t.clone() for t in teacher]
    m = torch.tensor(0.996, device="cuda")
    ema_update_(teacher, student, m)                       # auto -> triton on CUDA
    for out, t0, s in zip(teacher, before, student):
        _assert_close_to_exact(out.cpu(), t0.cpu(), s.cpu(), float(m), "triton")


# --------------------------------------------------------------------------- errors
def test_error_messages():
    a, b = _make([3, 4], torch.float32, torch.float32)
    with pytest.raises(ValueError, match="teacher_params has 2 tensors but student_params has 1"):
        ema_update_(a, b[:1], 0.9)
    with pytest.raises(ValueError, match=r"shape mismatch at index 1: teacher \(4,\) vs student \(2, 2\)"):
        ema_update_(a, [b[0], b[1].view(2, 2)], 0.9)
    with pytest.raises(ValueError, match=r"device mismatch at index 0: teacher on cpu, student on meta"):
        ema_update_(a, [torch.empty(3, device="meta"), b[1]], 0.9)
    with pytest.raises(TypeError, match=r"impl='triton'\): index 0: teacher torch.float16"):
        ema_update_([a[0].half()], [b[0].half()], 0.9, impl="triton")
    with pytest.raises(ValueError, match="momentum must be in"):
        ema_update_(a, b, 1.5)
    with pytest.raises(ValueError, match="momentum tensor must have one element"):
        ema_update_(a, b, torch.tensor([0.9, 0.9]))
    with pytest.raises(TypeError, match="momentum tensor must be floating point"):
        ema_update_(a, b, torch.tensor(1))
    with pytest.raises(ValueError, match="impl must be one of"):
        ema_update_(a, b, 0.9, impl="cuda")
    with pytest.raises(TypeError, match="got a single tensor"):
        ema_update_(a[0], b[0], 0.9)
    with pytest.raises(TypeError, match=r"student_params\[1\] is a str"):
        ema_update_(a, [b[0], "x"], 0.9)
    # other dtypes still work through the foreach path
    h_t, h_s = [a[0].half()], [b[0].half()]
    ema_update_(h_t, h_s, 0.5)
    torch.testing.assert_close(h_t[0], ((a[0] + b[0]) / 2).half(), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- schedule
def test_momentum_schedule_is_reference_cosine():
    """main_dino.py: cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep):
    λ_it = 1 + (λ0 − 1)·(1 + cos(π·it / N)) / 2, N = epochs·niter_per_ep."""
    epochs, niter = 7, 13
    sched = MomentumSchedule(0.996, epochs, niter)
    n = epochs * niter
    expect = [1 + (0.996 - 1) * (1 + math.cos(math.pi * it / n)) / 2 for it in range(n)]
    assert len(sched) == n
    np.testing.assert_allclose([sched[it] for it in range(n)], expect, rtol=0, atol=1e-15)
    assert sched[0] == pytest.approx(0.996, abs=1e-15) and sched[n - 1] < 1.0
    assert all(isinstance(sched[it], float) for it in (0, n - 1))
    dev = sched.as_tensor()      # fp64 keeps 1-λ exact for the EMA; fp32 accepted
    assert dev.dtype in (torch.float32, torch.float64) and dev.shape == (n,)
    np_dtype = np.float64 if dev.dtype == torch.float64 else np.float32
    np.testing.assert_allclose(dev.numpy(), np.asarray(expect, dtype=np_dtype), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- problem table, specs
def test_vit_b8_dino_param_shapes_match_the_architecture():
    """Backbone shapes equal timm's ViT-B/8 (same layout as the reference), the
    head equals the reference DINOHead built in plain torch (meta device)."""
    import timm

    shapes = vit_b8_dino_param_shapes()
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0)
        head_mlp = torch.nn.Sequential(torch.nn.Linear(768, 2048), torch.nn.GELU(),
                                       torch.nn.Linear(2048, 2048), torch.nn.GELU(),
                                       torch.nn.Linear(2048, 256))
        last = torch.nn.utils.weight_norm(torch.nn.Linear(256, 65536, bias=False))
    expect = {"backbone." + k: tuple(p.shape) for k, p in vit.named_parameters()}
    expect.update({"head.mlp." + k: tuple(p.shape) for k, p in head_mlp.named_parameters()})
    expect.update({"head.last_layer." + k: tuple(p.shape) for k, p in last.named_parameters()})
    assert shapes == expect
    assert sum(math.prod(s) for s in shapes.values()) == 85_807_872 + 23_138_560  # ≈ 109 M
    # and the project's own model, in student.parameters() order
    from dino_fast.model import DINOHead, MultiCropWrapper, vit_base
    with torch.device("meta"):
        model = MultiCropWrapper(vit_base(patch_size=8), DINOHead(768, 65536))
    assert list(shapes.items()) == [(k, tuple(p.shape)) for k, p in model.named_parameters()]


def test_compile_specs_cover_every_launch_variant():
    specs = compile_specs()
    assert len(specs) == 2 * 2 * 2 * 2                 # t dtype x s dtype x momentum source x aligned
    assert len({(s.signature["t_ref"], s.signature["s_ref"], s.config) for s in specs}) == len(specs)
    for s in specs:
        assert s.fn is ema._ema_kernel and s.constexprs["BLOCK"] == ema.BLOCK
        assert s.num_warps == ema.NUM_WARPS and s.num_stages == ema.NUM_STAGES
        assert set(s.constexprs) <= set(s.signature)
    grid = sum(math.ceil(math.prod(sh) / 4096) for sh in vit_b8_dino_param_shapes().values())
    assert all(s.problem["grid"] == grid for s in specs) and grid == 26671


_AOT = r"""
import os, subprocess, sys, tempfile, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from dino_fast.kernels.ema import compile_specs
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for sp in compile_specs():
    for cc, arch in ((90, "sm_90a"), (80, "sm_80")):
        k = triton.compile(ASTSource(sp.fn, sp.signature, sp.constexprs), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": sp.num_warps, "num_stages": sp.num_stages})
        ptx = k.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name=" + arch, f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        os.unlink(f.name)
        spills = "0 bytes spill stores, 0 bytes spill loads" in log
        vec = ptx.count("ld.global.v4")
        print(sp.dtype, sp.config, arch, "spill-free" if spills else "SPILLS", "v4", vec)
        assert spills, log
        assert (vec > 0) == sp.constexprs["ALIGNED"], (sp.config, vec)
"""


def test_aot_compiles_sm90_sm80_without_spills():
    """Every spec compiles ahead of time for sm_90a and sm_80 with zero spills,
    and the aligned variants use 128-bit loads (fresh process: no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("spill-free") == 2 * len(compile_specs())
