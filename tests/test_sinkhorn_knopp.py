"""Log-domain Sinkhorn-Knopp (dino_fast.kernels.sinkhorn_knopp) against
DINOv2's algorithm written here in float64, and against the float64
log-domain iteration where a plain exp overflows.

On CPU the "triton" impl runs under the Triton interpreter. Shapes: K = 1001
(odd, 8 column blocks of the prototype kernel, several K chunks of the sample
kernel), 37 rows (3 row groups; the prototype kernel splits them in 2 groups
under the interpreter's 2 "SMs"). Tolerance: max error <= (1e-6 + 1e-7 *
max|t / tau|) of max q -- fp32 rounds x = t / tau to 6e-8 relative, an
absolute error of 6e-8 |x| in every exponent (|x| reaches 900 in the overflow
case); bf16 logits: the same, against the reference on the rounded values
(accumulation is fp32).
"""
import pytest
import torch

from tests import launch_recorder
from dino_fast.kernels import sinkhorn_knopp as skm
from dino_fast.kernels.sinkhorn_knopp import sinkhorn_knopp
from dino_fast.kernels.softmax_teacher import SoftmaxTeacher

IMPLS = ("triton", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the interpreter runs the kernels
pytestmark = pytest.mark.gpu   # DEVICE follows CUDA: dino-fast bench --gpu-check runs this module
N, K, TAU = 37, 1001, 0.04


def dinov2_sinkhorn_float64(t, tau, n_iterations=3):
    """DINOv2's sinkhorn_knopp_teacher (one process), in float64."""
    Q = torch.exp(t.double() / tau).t()                 # (K, B)
    B, Kq = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= Kq
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def log_sinkhorn_float64(t, tau, n_iterations=3):
    """The same iteration in the log domain (never overflows), float64."""
    x = t.double() / tau
    u = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)    # per-sample log-scaling
    for _ in range(n_iterations):
        v = -torch.logsumexp(x + u[:, None], dim=0) - torch.log(torch.tensor(float(x.shape[1]), dtype=x.dtype))
        u = -torch.logsumexp(x + v, dim=1) - torch.log(torch.tensor(float(x.shape[0]), dtype=x.dtype))
    return torch.exp(x + v + u[:, None] + torch.log(torch.tensor(float(x.shape[0]), dtype=x.dtype)))


def _logits(scale, dtype=torch.float32, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale).to(DEVICE, dtype)


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def _tol(t, tau=TAU):
    return 1e-6 + 1e-7 * float((t.double() / tau).abs().max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_equals_dinov2_where_finite(impl, dtype, n_iterations):
    t = _logits(1.0, dtype)                              # |t| / tau <= ~100: float64 plain exp is finite
    ref = dinov2_sinkhorn_float64(t, TAU, n_iterations)
    assert torch.isfinite(ref).all()
    q = sinkhorn_knopp(t, TAU, n_iterations, impl=impl)
    assert q.dtype == torch.float32 and q.shape == (N, K)
    assert _rel(q, ref) <= _tol(t)
    torch.testing.assert_close(q.sum(-1).double(), torch.ones(N, dtype=torch.float64, device=DEVICE), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_log_domain_float64(impl):
    for n_it in (2, 5):
        t = _logits(0.5)
        assert _rel(sinkhorn_knopp(t, TAU, n_it, impl=impl), log_sinkhorn_float64(t, TAU, n_it)) <= _tol(t)
    # the two float64 formulas agree where the plain one is finite
    t = _logits(0.5)
    assert _rel(log_sinkhorn_float64(t, TAU), dinov2_sinkhorn_float64(t, TAU)) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_finite_and_exact_where_exp_overflows(impl, dtype):
    # DINOv3's head has no weight norm: logits of a few units at tau = 0.04 give t/tau ~ 900
    t = _logits(8.0, dtype)
    assert (t.float() / TAU).abs().max() > 88.7       # exp overflows fp32
    plain = dinov2_sinkhorn_float64(t.float(), TAU).float()
    fp32_plain = torch.exp(t.float() / TAU)
    assert not torch.isfinite(fp32_plain).all()        # DINOv2's first step in fp32
    assert not torch.isfinite(plain).all()             # even float64 under/overflows at this scale
    q = sinkhorn_knopp(t, TAU, impl=impl)
    assert torch.isfinite(q).all()
    assert _rel(q, log_sinkhorn_float64(t, TAU)) <= _tol(t)


@pytest.mark.parametrize("impl", IMPLS)
def test_implicit_teacher_and_its_statistics(impl):
    t = _logits(2.0)
    teacher = sinkhorn_knopp(t, TAU, impl=impl, materialize=False)
    assert isinstance(teacher, SoftmaxTeacher)
    ref = log_sinkhorn_float64(t, TAU)
    assert teacher.shift.shape == (K,) and teacher.lse.shape == (N,)
    assert _rel(teacher.materialize(impl), ref) <= _tol(t)
    # q = exp(t/tau + shift - lse) by definition
    direct = (t.double() / TAU + teacher.shift.double() - teacher.lse.double()[:, None]).exp()
    assert _rel(direct, ref) <= _tol(t)
    ent = -(ref * ref.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(teacher.entropy.double(), ent, rtol=0, atol=5e-5)
    torch.testing.assert_close(teacher.max_prob.double(), ref.amax(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(teacher.stats()["teacher_entropy"].double(), ent.mean(), rtol=0, atol=5e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_row_and_no_row(impl):
    t = _logits(1.0, n=1)
    torch.testing.assert_close(sinkhorn_knopp(t, TAU, impl=impl).double(), dinov2_sinkhorn_float64(t, TAU),
                               rtol=1e-5, atol=1e-7)
    assert sinkhorn_knopp(t[:0], TAU, impl=impl).shape == (0, K)


def test_bad_arguments():
    t = _logits(1.0)
    with pytest.raises(ValueError, match="n_iterations must be >= 1"):
        sinkhorn_knopp(t, TAU, 0)
    with pytest.raises(ValueError, match="must be 2-D"):
        sinkhorn_knopp(t[None], TAU)
    with pytest.raises(ValueError, match="impl must be one of"):
        sinkhorn_knopp(t, TAU, impl="cuda")


def test_prototype_kernel_splits_rows_into_groups():
    # the shapes above exercise several row groups and column blocks
    plan = skm._proto_plan(N, K, 2)
    assert plan["n_groups"] >= 2 and plan["k_blocks"] >= 8


def test_launches_only_declared_configs():
    from dino_fast.kernels import softmax_teacher as stm
    specs = skm.compile_specs() + stm.compile_specs()
    with launch_recorder.record_launches(skm) as rec, launch_recorder.record_launches(stm) as rec2:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for k in (K, 1024):
                sinkhorn_knopp(_logits(1.0, dtype, k=k), TAU, impl="triton")
    launches = rec.launches + rec2.launches
    names = {launch.kernel for launch in launches}
    assert {"_prototype_lse_kernel", "_prototype_lse_finish_kernel", "_sample_lse_kernel",
            "_sample_lse_finish_kernel", "_softmax_q_kernel"} <= names
    assert launch_recorder.undeclared_launches(launches, specs) == []
