"""dino_fast.dinov2.iBOTPatchLoss against DINOv2's `iBOTPatchLoss`
formulation written here (float64; its log_softmax `lossfunc`, as current
xformers no longer ships the fused cross_entropy).

5 images (odd) of 13 patches, one image with no masked patch, K = 301 (odd).
Tolerances: fp32 -- loss rel 2e-5 (the teacher recomputed from t / tau ~ 200),
gradient max error <= 2e-5 of max|grad|; bf16 -- gradient within 1e-2.
"""
import pytest
import torch
import torch.nn as nn

from dino_fast.dinov2 import SoftmaxTeacher, iBOTPatchLoss
from dino_fast.dinov2.ibot_patch_loss import masks_weight_from_masks

IMPLS = ("triton", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the interpreter runs the kernels
pytestmark = pytest.mark.gpu   # DEVICE follows CUDA: dino-fast bench --gpu-check runs this module
IMAGES, P, K, TAU = 5, 13, 301, 0.04


class DINOv2iBOTPatchLoss(nn.Module):
    """DINOv2's ibot_patch_loss.iBOTPatchLoss (one process; its Sinkhorn-Knopp
    without the unconditional dist.all_reduce), run in float64 here."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.updated = True

    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        self.apply_center_update()
        return torch.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        Q = torch.exp(teacher_output / teacher_temp).t()
        Bq, Kq = n_masked_patches_tensor, Q.shape[0]
        Q /= torch.sum(Q)
        for _ in range(n_iterations):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= Kq
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= Bq
        Q *= Bq
        return Q.t()

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        loss = torch.sum(teacher_patch_tokens * torch.log_softmax(student_patch_tokens / self.student_temp, -1), -1)
        loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(self, s, t, student_masks_flat, n_masked_patches=None, masks_weight=None):
        loss = torch.sum(t * torch.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                            .expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    def update_center(self, teacher_patch_tokens):
        self.updated = False
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        self.async_batch_center = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)

    def apply_center_update(self):
        if self.updated is False:
            _t = self.async_batch_center / self.len_teacher_patch_tokens
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


def _batch(dtype=torch.float32, seed=0, t_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(IMAGES, P, generator=g) < 0.4
    masks[2] = False                                              # an image with no masked patch
    masks[0, :3] = True
    s_all = (torch.randn(IMAGES, P, K, generator=g) * 3).to(DEVICE, dtype)
    t_all = (torch.randn(IMAGES, P, K, generator=g) * t_scale).to(DEVICE, dtype)
    masks = masks.to(DEVICE)
    idx = masks.flatten().nonzero().flatten()                     # DINOv2's mask_indices_list
    return masks, s_all, t_all, idx


def _rel_grad(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


def test_masks_weight_without_boolean_indexing():
    masks, _, _, idx = _batch()
    want = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    torch.testing.assert_close(masks_weight_from_masks(masks, len(idx)), want, rtol=0, atol=0)


def test_state_dict_matches_dinov2():
    ours, theirs = iBOTPatchLoss(K).to(DEVICE), DINOv2iBOTPatchLoss(K).to(DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"center"}
    theirs.center = torch.randn(1, 1, K, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.center, theirs.center)
    assert ours.center.shape == (1, 1, K)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("given_weight", [True, False])
def test_forward_masked_with_sinkhorn_knopp(impl, dtype, given_weight):
    masks, s_all, t_all, idx = _batch(dtype)
    n = len(idx)
    upper = n + 4                                                 # DINOv2 pads the masked rows to an upper bound
    s_rows = torch.cat([s_all.flatten(0, 1)[idx], torch.zeros(4, K, dtype=dtype, device=DEVICE)]).requires_grad_()  # (upper, K)
    t_rows = t_all.flatten(0, 1)[idx]                             # (n, K)
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    ours, ref = iBOTPatchLoss(K, impl=impl).to(DEVICE), DINOv2iBOTPatchLoss(K).double().to(DEVICE)
    q = ours.sinkhorn_knopp_teacher(t_rows, TAU, n_masked_patches_tensor=torch.tensor([n], device=DEVICE))
    q_ref = ref.sinkhorn_knopp_teacher(t_rows.double(), TAU, n)
    torch.testing.assert_close(q.double(), q_ref, rtol=0, atol=2e-5 * float(q_ref.max()))
    loss = ours.forward_masked(s_rows, q, student_masks_flat=masks, n_masked_patches=n,
                               masks_weight=weight if given_weight else None)
    loss.backward()
    s64 = s_rows.detach().double().requires_grad_()
    loss_ref = ref.forward_masked(s64[:n], q_ref, masks, n_masked_patches=n, masks_weight=weight.double())
    loss_ref.backward()
    torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=2e-5, atol=0)
    assert _rel_grad(s_rows.grad, s64.grad) <= (2e-5 if dtype == torch.float32 else 1e-2)
    assert (s_rows.grad[n:] == 0).all()
    # the implicit teacher (never materialised) gives the same loss
    implicit = ours.sinkhorn_knopp_teacher(t_rows, TAU, torch.tensor([n], device=DEVICE), materialize=False)
    assert isinstance(implicit, SoftmaxTeacher)
    loss2 = ours.forward_masked(s_rows, implicit, masks, n_masked_patches=n, masks_weight=weight)
    torch.testing.assert_close(loss2.double(), loss_ref.detach(), rtol=2e-5, atol=0)
    assert {"teacher_entropy", "student_entropy"} <= set(ours.last_stats)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_over_all_patches(impl):
    masks, s_all, t_all, _ = _batch()
    ours, ref = iBOTPatchLoss(K, impl=impl).to(DEVICE), DINOv2iBOTPatchLoss(K).double().to(DEVICE)
    q = torch.softmax(t_all.double() / TAU, -1)
    s = s_all.clone().requires_grad_()
    loss = ours(s, q.float(), masks)
    loss.backward()
    s64 = s_all.double().requires_grad_()
    loss_ref = ref(s64, q, masks)
    loss_ref.backward()
    torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=2e-6, atol=0)
    assert _rel_grad(s.grad, s64.grad) <= 2e-5
    assert (s.grad[2] == 0).all()                                 # the image without masked patches


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("materialize", [True, False])
def test_softmax_centring_with_lazy_update(impl, materialize):
    ours, ref = iBOTPatchLoss(K, impl=impl).to(DEVICE), DINOv2iBOTPatchLoss(K).double().to(DEVICE)
    for step in range(3):
        masks, s_all, t_all, idx = _batch(seed=step)
        n = len(idx)
        t_rows = t_all.flatten(0, 1)[idx].unsqueeze(0)             # (1, n, K), as DINOv2's meta arch
        q = ours.softmax_center_teacher(t_rows[:, :n], TAU, materialize=materialize)
        q_ref = ref.softmax_center_teacher(t_rows[:, :n].double(), TAU)
        if not materialize:
            q = q.materialize(impl).view(1, n, K)
        torch.testing.assert_close(q.double(), q_ref, rtol=0, atol=2e-5)
        s_rows = s_all.flatten(0, 1)[idx]
        loss = ours.forward_masked(s_rows, q.squeeze(0) if materialize else
                                   ours.softmax_center_teacher(t_rows[0], TAU, update_centers=False,
                                                               materialize=False), masks)
        loss_ref = ref.forward_masked(s_rows.double(), q_ref.squeeze(0), masks)
        torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
        ours.update_center(t_rows[:n])
        ref.update_center(t_rows[:n].double())
    ours.apply_center_update()
    ref.apply_center_update()
    torch.testing.assert_close(ours.center.double(), ref.center, rtol=1e-6, atol=1e-7)
    assert ref.center.abs().max() > 0.01


@pytest.mark.parametrize("impl", IMPLS)
def test_sinkhorn_knopp_where_dinov2_overflows(impl):
    masks, s_all, t_all, idx = _batch(t_scale=8.0)
    t_rows = t_all.flatten(0, 1)[idx]
    assert not torch.isfinite(DINOv2iBOTPatchLoss(K).sinkhorn_knopp_teacher(t_rows, TAU, len(idx))).all()
    q = iBOTPatchLoss(K, impl=impl).sinkhorn_knopp_teacher(t_rows, TAU, torch.tensor([len(idx)], device=DEVICE))
    x = t_rows.double() / TAU
    lse = torch.zeros(len(idx), dtype=torch.float64, device=x.device)
    for _ in range(3):
        v = -torch.logsumexp(x - lse[:, None], 0)
        lse = torch.logsumexp(x + v, 1)
    q64 = torch.exp(x + v - lse[:, None])
    torch.testing.assert_close(q.double(), q64, rtol=0, atol=1e-4 * float(q64.max()))


def test_no_masked_patch_at_all():
    masks = torch.zeros(IMAGES, P, dtype=torch.bool, device=DEVICE)
    s = torch.zeros(0, K, device=DEVICE, requires_grad=True)
    loss = iBOTPatchLoss(K).to(DEVICE).forward_masked(s, torch.zeros(0, K, device=DEVICE), masks)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_a_wrong_masked_token_count_is_caught():
    # torch._assert_async: raised at once on CPU; on CUDA a device-side assert (which would end
    # this test process's CUDA context, so it is checked on CPU tensors only)
    masks, _, _, idx = _batch()
    with pytest.raises(RuntimeError):
        masks_weight_from_masks(masks.cpu(), len(idx) - 1)


def test_masks_weight_size_is_checked():
    masks, s_all, t_all, idx = _batch()
    rows = s_all.flatten(0, 1)[idx]
    with pytest.raises(ValueError, match="masks_weight has 3 elements"):
        iBOTPatchLoss(K).forward_masked(rows, torch.softmax(rows, -1), masks, masks_weight=torch.ones(3, device=DEVICE))
