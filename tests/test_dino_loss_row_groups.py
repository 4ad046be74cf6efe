"""Fused DINO loss with several teacher row groups (dino_fast.kernels.dino_loss).

The teacher kernels work on groups of `_TEACHER_CFG["BLOCK_R"]` = 16 rows: every
real batch (B = 64: 128 teacher rows, 8 groups) has several, and the centre
column sums are reduced over the groups in a fixed order by the finish kernel.
tests/test_dino_loss.py stays at 2·B <= 16 on the CPU; here 2·B = 18, 40 and 66
(2, 3 and 5 groups; 66 rows also split the teacher finish kernel over 2 programs)
with odd K, fp32 and bf16, forward, gradient, the teacher column sum and the
centre update, each against the DINO formula written below in float64 (not the
reference module, not the kernels' torch twin).

Tolerances: fp32 -- loss rel 2e-5, gradient max-abs error <= 2e-5 of max|grad|,
column sums rel 1e-6 (fp32 sums of <= 66 values), centre 1e-6; bf16 inputs (the
float64 formula runs on the same bf16-rounded values, the kernels accumulate in
fp32) -- loss rel 2e-5, gradient (returned in bf16) within 1e-2 of max|grad|,
column sums and centre as fp32.
"""
import pytest
import torch

from dino_fast.kernels import dino_loss as dl
from dino_fast.kernels.dino_loss import dino_loss
from dino_fast.losses.dino_loss import DINOLoss

TT, TS, M = 0.04, 0.1, 0.9          # teacher / student temperature, centre momentum


def formula(s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, ncrops: int, n_tv: int = 2):
    """The DINO objective in float64: mean over pairs (i, v != i) of the batch mean of
    -<softmax((t_i - c)/TT), log_softmax(s_v/TS)>; returns (loss, d loss / d s, column
    sum of t, next centre)."""
    s = s.double().detach().requires_grad_()
    t, c = t.double(), c.double()
    B = t.shape[0] // n_tv
    q = torch.softmax((t - c) / TT, dim=-1).view(n_tv, B, -1)
    logp = torch.log_softmax(s / TS, dim=-1).view(ncrops, B, -1)
    terms = [-(q[i] * logp[v]).sum(-1).mean() for i in range(n_tv) for v in range(ncrops) if v != i]
    loss = torch.stack(terms).mean()
    (grad,) = torch.autograd.grad(loss, s)
    colsum = t.sum(0, keepdim=True)
    return loss.detach(), grad, colsum, M * c + (1 - M) * colsum / t.shape[0]


def _inputs(B, K, ncrops, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(ncrops * B, K, generator=g) * 2).to(dtype)
    t = (torch.randn(2 * B, K, generator=g) * 2).to(dtype)
    # rows of very different scale per group, so a group that is dropped or mixed up moves the sums
    t = t * torch.linspace(0.5, 3.0, 2 * B)[:, None].to(dtype)
    c = torch.randn(1, K, generator=g) * 0.5
    return s, t, c


CASES = [  # (B, K, ncrops): 2B teacher rows -> ceil(2B/16) groups
    (9, 333, 4),        # 18 rows: 2 groups, the second with 2 rows
    (20, 257, 3),       # 40 rows: 3 groups (16, 16, 8), odd crop count
    (33, 129, 2),       # 66 rows: 5 groups, 2 teacher-finish programs
]


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B,K,ncrops", CASES)
def test_several_row_groups_match_formula(B, K, ncrops, dtype, grad_tol):
    plan = dl._plan(B, K, ncrops, 2, dl._num_sms(torch.device("cpu")))
    assert plan["groups"] == -(-2 * B // dl._TEACHER_CFG["BLOCK_R"]) >= 2     # the case has several groups
    s, t, c = _inputs(B, K, ncrops, dtype, seed=B)
    loss_ref, grad_ref, colsum_ref, center_ref = formula(s, t, c, ncrops)

    # functional op: loss, gradient, teacher column sum
    x = s.clone().requires_grad_()
    loss, colsum = dino_loss(x, t, c, ncrops, TT, TS, impl="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=0)
    assert x.grad.dtype == dtype
    err = (x.grad.double() - grad_ref).abs().max().item()
    assert err <= grad_tol * grad_ref.abs().max().item(), (err, grad_ref.abs().max().item())
    torch.testing.assert_close(colsum.double(), colsum_ref, rtol=1e-6, atol=1e-5)

    # the module: centre c <- m c + (1 - m) mean(t) over all rows of every group
    mod = DINOLoss(K, ncrops, TT, TT, 0, 1, student_temp=TS, center_momentum=M, impl="triton")
    mod.center.copy_(c)
    mod_loss = mod(s.clone().requires_grad_(), t, 0)
    torch.testing.assert_close(mod_loss.double(), loss_ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(mod.center.double(), center_ref, rtol=1e-6, atol=1e-6)


def test_formula_sees_every_group():
    """The check can fail: a loss that ignores all teacher rows past the first group of 16
    (what a kernel using only group 0 would compute) differs from the formula."""
    B, K, ncrops = 20, 257, 3
    s, t, c = _inputs(B, K, ncrops, torch.float32, seed=B)
    loss_ref, _, colsum_ref, _ = formula(s, t, c, ncrops)
    first = t.clone()
    first[16:] = c                      # rows past group 0 replaced: uniform teacher there
    loss_first, _, colsum_first, _ = formula(s, first, c, ncrops)
    assert abs(loss_first - loss_ref) > 1e-3 * abs(loss_ref)
    assert (colsum_first - colsum_ref).abs().max() > 1.0
