"""Fused soft-target cross-entropy over crop pairs (dino_fast.kernels.softmax_ce)
against the double loop written here in float64.

On CPU the "triton" impl runs under the Triton interpreter. Shapes: K = 1001
(odd; several BLOCK_K tiles and several K chunks per row), B = 3 and 1, crop
counts covering every tile layout (paired tile only, + other tile of 8 / 16
rows, one teacher crop, fewer student than teacher crops). Tolerances: fp32
-- loss rel 2e-6, gradient max error <= 1e-5 of max|grad| (x = s / tau_s reaches
120 here: fp32 rounds p = exp(x - lse) to 120 * 6e-8); bf16 / fp16
student logits -- loss against the float64 formula on the same rounded values
rel 2e-6 (fp32 accumulation), gradient (returned in the input dtype) within
1e-2 of max|grad|; a teacher recomputed from logits (|t / tau_t| ~ 200): loss
rel 2e-5.
"""
import pytest
import torch

from tests import launch_recorder
from dino_fast.kernels import softmax_ce as sce
from dino_fast.kernels.softmax_ce import softmax_ce
from dino_fast.kernels.softmax_teacher import SoftmaxTeacher, softmax_teacher
from tests.conftest import requires_cuda

IMPLS = ("triton", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the interpreter runs the kernels
pytestmark = pytest.mark.gpu   # DEVICE follows CUDA: dino-fast bench --gpu-check runs this module
K, TS, TT = 1001, 0.1, 0.04


def ce_float64(student, teacher_probs, ignore_diagonal=False, weights=None, scale=1.0, tau_s=TS):
    """sum_b w_b sum_{s,t paired} -<q_tb, log_softmax(s_sb / tau_s)> * scale, float64, crop by crop."""
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    for si, s in enumerate(student.double()):
        lsm = torch.log_softmax(s / tau_s, dim=-1)
        for ti, q in enumerate(teacher_probs.double()):
            if ignore_diagonal and si == ti:
                continue
            ce = -(q * lsm).sum(-1)
            total = total + (ce if weights is None else ce * weights.double()).sum()
    return total * scale


def _inputs(S, T, B, dtype=torch.float32, seed=0, s_scale=3.0, t_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(S, B, K, generator=g) * s_scale).to(DEVICE, dtype)
    t_logits = (torch.randn(T * B, K, generator=g) * t_scale).to(DEVICE, dtype)
    center = (torch.randn(K, generator=g) * 0.3).to(DEVICE)
    w = (torch.rand(B, generator=g) + 0.5).to(DEVICE)
    return s, t_logits, center, w


def _probs64(t_logits, center):
    return torch.softmax((t_logits.double() - center.double()) / TT, dim=-1)


def _check(loss, grad, s, q64, diag, w, scale, dtype, rtol=2e-6):
    s64 = s.detach().double().requires_grad_()
    ref = ce_float64(s64, q64, diag, w, scale)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=0)
    err = float((grad.double() - s64.grad).abs().max() / s64.grad.abs().max())
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err
    assert grad.dtype == dtype


LAYOUTS = [  # (S, T, ignore_diagonal): the crop pairings of DINOv2 / DINOv3 calls
    (10, 2, True),    # all crops at once, DINO pairing (paired tile + other tile of 8)
    (8, 2, False),    # DINOv2 / DINOv3 local crops vs the 2 teacher crops
    (2, 2, True),     # DINOv3 global crops, ignore_diagonal
    (1, 1, False),    # DINOv2 global call ([2B] vs [2B]) and iBOT
    (11, 2, False),   # other tile of 16
    (3, 1, False),    # one teacher crop
    (1, 2, False),    # fewer student crops than teacher crops
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S,T,diag", LAYOUTS)
def test_given_probabilities_fp32(impl, S, T, diag):
    B = 3
    s, t_logits, center, w = _inputs(S, T, B)
    q64 = _probs64(t_logits, center)
    q = q64.float().view(T, B, K)
    s = s.requires_grad_()
    loss = softmax_ce(s, q, ignore_diagonal=diag, weights=w, scale=0.37, impl=impl)
    loss.backward()
    _check(loss, s.grad, s, q.double(), diag, w, 0.37, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("S,T,diag", [(10, 2, True), (1, 1, False)])
def test_implicit_teacher(impl, dtype, S, T, diag):
    # the teacher as logits + shift + lse (softmax centring): q recomputed in the kernels
    B = 3
    s, t_logits, center, _ = _inputs(S, T, B, dtype)
    teacher = softmax_teacher(t_logits, TT, center, impl="torch")
    s = s.requires_grad_()
    loss = softmax_ce(s, teacher, ignore_diagonal=diag, scale=1.0 / (B * 7), impl=impl)
    loss.backward()
    q64 = torch.softmax((t_logits.double() - center.double()) / TT, dim=-1).view(T, B, K)
    # q recomputed from x_t = t / tau_t (|x_t| ~ 200 here): fp32 rounds q to 200 * 6e-8
    _check(loss, s.grad, s, q64, diag, None, 1.0 / (B * 7), dtype, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_unnormalised_probabilities_and_one_image(impl):
    # rows that do not sum to 1 (e.g. rounded probabilities): the mass is not assumed
    s, t_logits, center, w = _inputs(3, 2, 1)
    q = (_probs64(t_logits, center) * torch.linspace(0.5, 1.5, K, dtype=torch.float64, device=DEVICE)).float().view(2, 1, K)
    s = s.requires_grad_()
    loss = softmax_ce(s, q, ignore_diagonal=True, weights=w, impl=impl)
    loss.backward()
    _check(loss, s.grad, s, q.double(), True, w, 1.0, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_student_logits(impl):
    # |s| / tau_s up to ~1500: a plain exp overflows, the online log-sum-exp does not
    s, t_logits, center, _ = _inputs(4, 2, 3, s_scale=40.0)
    q = _probs64(t_logits, center).float().view(2, 3, K)
    s = s.requires_grad_()
    loss = softmax_ce(s, q, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    _check(loss, s.grad, s, q.double(), False, None, 1.0, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_crop_sequences_read_in_place_and_concatenated(impl):
    S, T, B = 5, 2, 3
    s, t_logits, center, _ = _inputs(S, T, B)
    q = _probs64(t_logits, center).float()
    flat = s.reshape(S * B, K).clone().requires_grad_()
    chunks = flat.chunk(S)                                          # adjacent: read in place
    loss = softmax_ce(chunks, q.chunk(T), impl=impl)
    loss.backward()
    _check(loss, flat.grad.view(S, B, K), s, q.double().view(T, B, K), False, None, 1.0, torch.float32)
    assert sce._adjacent(list(chunks))
    separate = [c.detach().clone().requires_grad_() for c in chunks]   # not adjacent: concatenated
    assert not sce._adjacent(separate)
    loss2 = softmax_ce(separate, [x for x in q.chunk(T)], impl=impl)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)
    for a, b in zip(separate, flat.grad.chunk(S)):
        torch.testing.assert_close(a.grad, b, rtol=1e-6, atol=1e-9)


def test_several_row_programs_and_k_chunks():
    # the shapes of these tests run several K chunks per batch index (or, with
    # one crop, several tiles per chunk: see test_many_masked_tokens)
    for S, T, _ in LAYOUTS:
        plan = sce._plan(3, K, S, T, 2)
        assert plan["n_chunks"] >= 2 or (S, T) == (1, 1), (S, T, plan)
    plan = sce._plan(37, 2500, 1, 1, 2)
    assert plan["n_chunks"] == 1 and plan["chunk"] >= 2 * plan["cfg"]["BLOCK_K"]


@pytest.mark.parametrize("impl", IMPLS)
def test_many_masked_tokens(impl):
    # iBOT's layout: one student and one teacher crop of many rows, per-row weights
    g = torch.Generator().manual_seed(1)
    N, k = 37, 2500
    s = (torch.randn(1, N, k, generator=g) * 3).to(DEVICE).requires_grad_()
    q64 = torch.softmax(torch.randn(1, N, k, generator=g, dtype=torch.float64) * 50, dim=-1).to(DEVICE)
    w = torch.rand(N, generator=g).to(DEVICE)
    loss = softmax_ce(s, q64.float(), weights=w, scale=1 / 7, impl=impl)
    loss.backward()
    _check(loss, s.grad, s, q64.float().double(), False, w, 1 / 7, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_rows_keeps_the_graph(impl):
    s = torch.zeros(2, 0, K, device=DEVICE, requires_grad=True)
    loss = softmax_ce(s, torch.zeros(2, 0, K, device=DEVICE), impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad.shape == s.shape


def test_teacher_logits_in_another_dtype_are_materialised():
    s, t_logits, center, _ = _inputs(3, 2, 3, torch.bfloat16)
    teacher = softmax_teacher(t_logits.float(), TT, center, impl="torch")     # fp32 logits, bf16 student
    s = s.requires_grad_()
    loss = softmax_ce(s, teacher, impl="triton")
    loss.backward()
    _check(loss, s.grad, s, _probs64(t_logits.float(), center).view(2, 3, K), False, None, 1.0, torch.bfloat16,
           rtol=2e-5)


def test_bad_input_is_named():
    s, t_logits, center, w = _inputs(3, 2, 3)
    q = _probs64(t_logits, center).float().view(2, 3, K)
    with pytest.raises(ValueError, match="same shape"):
        softmax_ce(s, q[:, :2])
    with pytest.raises(ValueError, match="weights must have B=3"):
        softmax_ce(s, q, weights=w[:2])
    with pytest.raises(ValueError, match=r"\(T\*B, K\)"):
        softmax_ce(s, SoftmaxTeacher(t_logits[:4], torch.zeros(K, device=DEVICE), torch.zeros(4, device=DEVICE),
                                      1.0 / TT))
    with pytest.raises(ValueError, match="must be \\(crops, B, K\\)"):
        softmax_ce(s[0], q)
    with pytest.raises(ValueError, match="<= 2 teacher crops"):
        softmax_ce(s, torch.cat([q, q[:1]]), impl="triton")
    # auto falls back to the torch impl where the crop counts do not fit the kernels
    q3 = torch.cat([q, q[:1]])
    torch.testing.assert_close(softmax_ce(s, q3).double(), ce_float64(s, q3.double()), rtol=2e-6, atol=0)


def test_launches_only_declared_configs():
    # every tile layout (BLOCK_T x BLOCK_L), dtype and teacher kind the launcher picks is declared
    specs = sce.compile_specs()
    k = 300
    with launch_recorder.record_launches(sce) as rec:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for S, T in ((2, 2), (10, 2), (12, 2), (34, 2), (1, 1), (3, 1), (10, 1), (18, 1)):
                g = torch.Generator().manual_seed(0)
                s = torch.randn(S, 1, k, generator=g).to(DEVICE, dtype).requires_grad_()
                t = torch.randn(T, k, generator=g).to(DEVICE, dtype)
                implicit = softmax_teacher(t, TT, impl="torch")
                for teacher in (implicit, implicit.materialize("torch").view(T, 1, k)):
                    softmax_ce(s, teacher, weights=torch.ones(1, device=DEVICE), impl="triton").backward()
    names = {launch.kernel for launch in rec.launches}
    assert {"_ce_fwd_kernel", "_ce_finish_kernel", "_ce_loss_kernel", "_ce_grad_kernel"} <= names
    layouts = {(launch.args["BLOCK_T"], launch.args["BLOCK_L"]) for launch in rec.launches
               if launch.kernel == "_ce_fwd_kernel"}
    assert layouts == {(t, l) for t in sce.BLOCK_TS for l in sce.BLOCK_LS}
    assert launch_recorder.undeclared_launches(rec.launches, specs) == []


@requires_cuda
def test_cuda_int64_offsets():
    # rows * K > 2^31 elements (iBOT layout, bf16: 4.4 GB per matrix): the rows past the
    # int32 range against float64 computed on those rows alone (rows are independent)
    N, k = 8300, 262144
    assert N * k > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(1, N, k, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(N, k, device="cuda", generator=g, dtype=torch.bfloat16)
    teacher = softmax_teacher(t, TT, impl="triton")
    w = torch.rand(N, device="cuda", generator=g)
    softmax_ce(s, teacher, weights=w, scale=0.5, impl="triton").backward()
    tail = slice(N - 3, N)
    q64 = torch.softmax(t[tail].double() / TT, -1)
    torch.testing.assert_close(teacher.rows(N - 3, N).materialize().double(), q64, rtol=0, atol=1e-4)
    p64 = torch.softmax(s[0, tail].double() / TS, -1)
    g64 = 0.5 * w[tail].double()[:, None] * (p64 - q64) / TS
    err = float((s.grad[0, tail].double() - g64).abs().max() / g64.abs().max())
    assert err <= 2e-2, err
