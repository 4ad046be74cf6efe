"""KoLeo (dino_fast.dinov2.KoLeoLoss, KoLeoLossDistributed in one process)
against the formula written here in float64: nearest neighbour by brute force
over all pairs of L2-normalised rows, DINOv2's PairwiseDistance eps added to
the difference. Odd batch (37) and width (65). Tolerances: fp32 loss rel 1e-6,
gradient max error <= 1e-5 of max|grad|.
"""
import pytest
import torch

from dino_fast.dinov2 import KoLeoLoss, KoLeoLossDistributed


def koleo_float64(x, eps=1e-8, topk=1):
    x = torch.nn.functional.normalize(x.double(), eps=eps, dim=-1)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)          # (B, B) squared distances
    d2.fill_diagonal_(float("inf"))
    nn_idx = d2.topk(topk, dim=1, largest=False).indices          # nearest other rows
    diff = x[:, None, :] - x[nn_idx] + eps                        # PairwiseDistance(2, eps): ||a - b + eps||
    return -torch.log(diff.norm(dim=-1) + eps).mean()


def _x(B=37, D=65, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g) * 2).to(dtype)


def _grad_check(module, x, **kw):
    x = x.clone().requires_grad_()
    loss = module(x)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = koleo_float64(x64, **kw)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    assert float((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()) <= 1e-5
    return loss


def test_koleo_matches_formula():
    _grad_check(KoLeoLoss(), _x())


def test_koleo_ignores_autocast_and_computes_in_fp32():
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    torch.testing.assert_close(loss.double(), koleo_float64(x), rtol=1e-6, atol=0)
    xb = x.bfloat16()
    torch.testing.assert_close(KoLeoLoss()(xb).double(), koleo_float64(xb.float()), rtol=1e-6, atol=0)


def test_duplicate_rows_give_the_eps_distance():
    x = _x(B=6)
    x[3] = x[1]
    ref = koleo_float64(x)
    torch.testing.assert_close(KoLeoLoss()(x).double(), ref, rtol=1e-6, atol=0)
    assert ref > 3.0                                               # -log of a ~1e-7 distance dominates


@pytest.mark.parametrize("topk", [1, 3])
def test_distributed_variant_in_one_process(topk):
    _grad_check(KoLeoLossDistributed(topk=topk), _x(), topk=topk)
    with pytest.raises(ValueError, match="multiple of the local batch size"):
        KoLeoLossDistributed(loss_group_size=10)(_x())


def test_state_dict_is_empty_as_dinov2():
    assert KoLeoLoss().state_dict() == {} and KoLeoLossDistributed().state_dict() == {}
