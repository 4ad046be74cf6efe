"""The implicit softmax-centred teacher (dino_fast.kernels.softmax_teacher)
against softmax((t - c) / tau) written here in float64.

K = 1001 (odd, several K chunks per row), 37 rows (3 row groups), fp32 / bf16
logits. Tolerance: max error <= (1e-6 + 1e-7 * max|x|) of max q with x the
exponent (fp32 rounds it to 6e-8 relative); entropies to 5e-5 nats.
"""
import pytest
import torch

from dino_fast.kernels import softmax_teacher as stm
from dino_fast.kernels.softmax_teacher import SoftmaxTeacher, softmax_teacher

IMPLS = ("triton", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the interpreter runs the kernels
pytestmark = pytest.mark.gpu   # DEVICE follows CUDA: dino-fast bench --gpu-check runs this module
N, K, TAU = 37, 1001, 0.04


def _inputs(scale, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, K, generator=g) * scale).to(DEVICE, dtype), torch.randn(K, generator=g).to(DEVICE)


def _ref(t, c):
    return torch.softmax((t.double() - c.double()) / TAU, dim=-1)


def _tol(t, c):
    return 1e-6 + 1e-7 * float(((t.double() - c.double()) / TAU).abs().max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [1.0, 8.0])          # 8: |t - c| / tau ~ 900, a plain exp overflows
def test_centred_softmax(impl, dtype, scale):
    t, c = _inputs(scale, dtype)
    teacher = softmax_teacher(t, TAU, c, impl=impl)
    assert isinstance(teacher, SoftmaxTeacher) and teacher.shape == (N, K)
    ref = _ref(t, c)
    q = teacher.materialize(impl)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert float((q.double() - ref).abs().max() / ref.abs().max()) <= _tol(t, c)
    ent = -(ref * ref.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(teacher.entropy.double(), ent, rtol=0, atol=5e-5)
    torch.testing.assert_close(teacher.max_prob.double(), ref.amax(-1), rtol=2e-5, atol=0)
    torch.testing.assert_close(teacher.lse.double(), torch.logsumexp(t.double() / TAU - c.double() / TAU, -1),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_and_no_center(impl):
    t, _ = _inputs(1.0)
    teacher = softmax_teacher(t, TAU, None, impl=impl)
    part = teacher.rows(5, 12)
    assert len(part) == 7 and part.entropy.shape == (7,)
    torch.testing.assert_close(part.materialize(impl).double(), torch.softmax(t[5:12].double() / TAU, -1),
                               rtol=0, atol=_tol(t, torch.zeros(K, device=DEVICE)))
    assert softmax_teacher(t[:0], TAU, impl=impl).materialize(impl).shape == (0, K)


def test_bad_center():
    t, c = _inputs(1.0)
    with pytest.raises(ValueError, match="center must have 1001 elements"):
        softmax_teacher(t, TAU, c[:10])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        softmax_teacher(t.double(), TAU, c)


def test_the_sample_kernel_splits_k_into_chunks():
    plan = stm._lse_plan(N, K, 2)
    assert plan["groups"] == 3 and plan["n_chunks"] >= 2
