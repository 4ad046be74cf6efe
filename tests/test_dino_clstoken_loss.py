"""dino_fast.dinov2.DINOLoss against DINOv2's `DINOLoss` formulation written
here (float64): constructor, state dict, lazy centre update, Sinkhorn-Knopp,
DINOv2's and DINOv3's forward forms, the whole CLS loss of a DINOv2 step.

K = 301 (odd), B = 3, 2 global + 8 local crops. Tolerances: fp32 -- loss rel
2e-5 (the Sinkhorn-Knopp or centred teacher recomputed from t / tau ~ 200:
fp32 rounds it to 200 * 6e-8), gradient max error <= 2e-5 of max|grad|;
bf16 student logits -- gradient within 1e-2 of max|grad|.
"""
import pytest
import torch
import torch.nn as nn

from dino_fast.dinov2 import DINOLoss, SoftmaxTeacher
from tests.conftest import requires_cuda

IMPLS = ("triton", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the interpreter runs the kernels
pytestmark = pytest.mark.gpu   # DEVICE follows CUDA: dino-fast bench --gpu-check runs this module
K, B, TAU = 301, 3, 0.04


class DINOv2DINOLoss(nn.Module):
    """DINOv2's dino_clstoken_loss.DINOLoss (one process), run in float64 here."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.updated = True
        self.async_batch_center = None

    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return torch.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        Q = torch.exp(teacher_output / teacher_temp).t()
        Bq, Kq = Q.shape[1], Q.shape[0]
        Q /= torch.sum(Q)
        for _ in range(n_iterations):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= Kq
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= Bq
        Q *= Bq
        return Q.t()

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total_loss = 0
        for s in student_output_list:
            lsm = torch.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss -= torch.sum(t * lsm, dim=-1).mean()
        return total_loss

    def update_center(self, teacher_output):
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = torch.sum(teacher_output, dim=0, keepdim=True)

    def apply_center_update(self):
        if self.updated is False:
            _t = self.async_batch_center / self.len_teacher_output
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


def log_sinkhorn_float64(t, tau, n_iterations=3):
    x = t.double() / tau
    lse = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _ in range(n_iterations):
        v = -torch.logsumexp(x - lse[:, None], dim=0)
        lse = torch.logsumexp(x + v, dim=1)
    return torch.exp(x + v - lse[:, None])


def _crops(dtype=torch.float32, t_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(2 * B, K, generator=g) * t_scale).to(DEVICE, dtype)   # (2B, K) global crops
    glob = (torch.randn(2 * B, K, generator=g) * 3).to(DEVICE, dtype)            # (2B, K)
    local = (torch.randn(8 * B, K, generator=g) * 3).to(DEVICE, dtype)           # (8B, K)
    return teacher, glob, local


def _dinov2_cls_loss(loss_fn, q, glob, local):
    """DINOv2's ssl_meta_arch CLS loss: local crops vs both teacher crops, global
    crops vs the swapped teacher crops, over n_terms = 16 + 2 pairs."""
    q = q.view(2, B, K)
    swapped = torch.cat([q[1], q[0]])
    n_terms = 2 * 8 + 2
    return (loss_fn(local.chunk(8), q) / n_terms
            + loss_fn([glob], [swapped]) * 2 / n_terms)


def test_state_dict_matches_dinov2():
    ours, theirs = DINOLoss(K).to(DEVICE), DINOv2DINOLoss(K).to(DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"center"}
    theirs.center = torch.randn(1, K, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.center, theirs.center)
    back = DINOv2DINOLoss(K).to(DEVICE)
    back.load_state_dict(ours.state_dict())
    assert ours.center.shape == (1, K) and ours.student_temp == 0.1 and ours.center_momentum == 0.9


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("materialize", [True, False])
def test_softmax_centring_with_lazy_update(impl, materialize):
    ours, ref = DINOLoss(K, impl=impl).to(DEVICE), DINOv2DINOLoss(K).double().to(DEVICE)
    for step in range(3):
        teacher, glob, local = _crops(seed=step)
        q = ours.softmax_center_teacher(teacher, TAU, materialize=materialize)
        q_ref = ref.softmax_center_teacher(teacher.double(), TAU)
        if not materialize:
            assert isinstance(q, SoftmaxTeacher)
            q = q.materialize(impl)
        torch.testing.assert_close(q.double(), q_ref, rtol=0, atol=2e-5)
        # the centre of this step is applied at the next softmax_center_teacher, not now
        before = ours.center.clone()
        ours.update_center(teacher)
        ref.update_center(teacher.double())
        torch.testing.assert_close(ours.center, before, rtol=0, atol=0)
        assert ours.updated is False
    torch.testing.assert_close(ours.center.double(), ref.center, rtol=1e-6, atol=1e-7)
    ours.apply_center_update()
    ref.apply_center_update()
    torch.testing.assert_close(ours.center.double(), ref.center, rtol=1e-6, atol=1e-7)
    assert ref.center.abs().max() > 0.05


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dinov2_step_with_sinkhorn_knopp(impl, dtype):
    teacher, glob, local = _crops(dtype)
    ours, ref = DINOLoss(K, impl=impl).to(DEVICE), DINOv2DINOLoss(K).double().to(DEVICE)
    q = ours.sinkhorn_knopp_teacher(teacher, TAU)
    q_ref = ref.sinkhorn_knopp_teacher(teacher.double(), TAU)
    assert q.dtype == torch.float32 and q.shape == (2 * B, K)
    torch.testing.assert_close(q.double(), q_ref, rtol=0, atol=2e-5 * float(q_ref.max()))
    # DINOv2's calls, unchanged, on our module
    g_, l_ = glob.clone().requires_grad_(), local.clone().requires_grad_()
    loss = _dinov2_cls_loss(ours, q, g_, l_)
    loss.backward()
    g64, l64 = glob.double().requires_grad_(), local.double().requires_grad_()
    loss_ref = _dinov2_cls_loss(ref, q_ref, g64, l64)
    loss_ref.backward()
    torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=2e-5, atol=0)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for got, want in ((g_.grad, g64.grad), (l_.grad, l64.grad)):
        assert got.dtype == dtype
        assert float((got.double() - want).abs().max() / want.abs().max()) <= tol
    # the same loss as ONE DINOv3-form call over all 10 crops, teacher never materialised:
    # student crops [global A, global B, locals], teacher [A, B], pairs (A, A), (B, B) skipped
    implicit = ours.sinkhorn_knopp_teacher(teacher, TAU, materialize=False)
    assert isinstance(implicit, SoftmaxTeacher)
    student = torch.cat([glob, local]).view(10, B, K).requires_grad_()
    fused = ours(student, implicit, ignore_diagonal=True)
    fused.backward()
    torch.testing.assert_close(fused.double(), loss_ref.detach(), rtol=2e-5, atol=0)
    want = torch.cat([g64.grad, l64.grad]).view(10, B, K)
    assert float((student.grad.double() - want).abs().max() / want.abs().max()) <= tol
    assert set(ours.last_stats) == {"teacher_entropy", "teacher_max_prob", "student_entropy"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dinov3_form(impl, ignore_diagonal):
    teacher, glob, local = _crops()
    q = torch.softmax(teacher.double() / TAU, -1).view(2, B, K)
    for S, s in ((2, glob), (8, local)):
        s = s.view(S, B, K).clone().requires_grad_()
        loss = DINOLoss(K, impl=impl).to(DEVICE)(student_logits=s, teacher_probs=q.float(), ignore_diagonal=ignore_diagonal)
        loss.backward()
        # DINOv3: einsum over (s, t, b), diagonal pairs dropped, mean over the remaining terms
        s64 = s.detach().double().requires_grad_()
        lsm = torch.log_softmax(s64 / 0.1, -1)
        per_pair = -torch.einsum("sbk,tbk->st", lsm, q)
        d = min(S, 2) if ignore_diagonal else 0
        keep = torch.ones(S, 2, dtype=torch.float64, device=DEVICE)
        keep[range(d), range(d)] = 0
        ref = (per_pair * keep).sum() / (B * (S * 2 - d))
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=0)
        assert float((s.grad.double() - s64.grad).abs().max() / s64.grad.abs().max()) <= 2e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_sinkhorn_knopp_where_dinov2_overflows(impl):
    teacher, glob, local = _crops(t_scale=8.0)                 # |t| / tau ~ 900 (DINOv3-like head)
    ref = DINOv2DINOLoss(K).to(DEVICE)                                      # fp32, as DINOv2 runs it
    q_ref = ref.sinkhorn_knopp_teacher(teacher, TAU)
    assert not torch.isfinite(q_ref).all()
    assert not torch.isfinite(_dinov2_cls_loss(ref, q_ref, glob, local))
    ours = DINOLoss(K, impl=impl).to(DEVICE)
    q = ours.sinkhorn_knopp_teacher(teacher, TAU)
    q64 = log_sinkhorn_float64(teacher, TAU)
    torch.testing.assert_close(q.double(), q64, rtol=0, atol=1e-4 * float(q64.max()))
    loss = _dinov2_cls_loss(ours, q, glob, local)
    loss64 = _dinov2_cls_loss(DINOv2DINOLoss(K).double().to(DEVICE), q64, glob.double(), local.double())
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=0)


def test_arguments_are_checked():
    loss = DINOLoss(K).to(DEVICE)
    teacher, glob, _ = _crops()
    with pytest.raises(TypeError, match="pass the student logits"):
        loss(student_logits=glob.view(2, B, K))
    with pytest.raises(ValueError, match="student_logits must be \\(student crops, B, K\\)"):
        loss(glob, torch.zeros(2, B, K, device=DEVICE))
    with pytest.raises(ValueError, match="impl must be one of"):
        DINOLoss(K, impl="fast")


@requires_cuda
def test_a_dinov2_loss_step_never_syncs_the_host():
    # DINO + iBOT (Sinkhorn-Knopp and softmax centring, weights from the mask) + KoLeo,
    # forward and backward, under CUDA's sync debug mode: any host sync raises
    from dino_fast.dinov2 import KoLeoLoss, iBOTPatchLoss
    dino, ibot, koleo = DINOLoss(K).cuda(), iBOTPatchLoss(K).cuda(), KoLeoLoss()
    teacher, glob, local = _crops()
    student = torch.cat([glob, local]).view(10, B, K).requires_grad_()
    masks = torch.zeros(2 * B, 16, dtype=torch.bool, device="cuda")
    masks[::2, :5] = True
    n = 5 * B
    t_patch, s_patch = teacher[:1].expand(n, K).contiguous(), glob[:1].expand(n, K).contiguous().requires_grad_()
    cls = torch.randn(2 * B, 33, device="cuda", requires_grad=True)

    def step():
        q = dino.sinkhorn_knopp_teacher(teacher, TAU, materialize=False)
        q_soft = dino.softmax_center_teacher(teacher, TAU, materialize=False)
        dino.update_center(teacher)
        qp = ibot.sinkhorn_knopp_teacher(t_patch, TAU, materialize=False)
        loss = (dino(student, q, ignore_diagonal=True) + dino(student, q_soft)
                + ibot.forward_masked(s_patch, qp, masks, n_masked_patches=n) + koleo(cls))
        loss.backward()
        return loss

    step()                                         # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
