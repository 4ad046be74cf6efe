"""Peers users would otherwise reach for, measured against dino-fast in the
same run (optional: each is skipped cleanly when the package is absent).

* lightly's `DINOLoss` (lightly.loss) vs our fused `DINOLoss`: forward +
  backward, B = 64, K = 65536, 2 + 10 views; same loss value asserted.
* timm's VisionTransformer with its fused (SDPA) attention vs our ViT on the
  same weights (exported with `to_timm`): forward + backward of a batch of
  224 px crops; same CLS features asserted.
The record's `speedup` is peer ms / dino-fast ms.
"""
import pytest
import torch

from dino_fast.benchmark import fwd_bwd_step
from dino_fast.benchmark.cases import dino_loss_traffic
from dino_fast.losses.dino_loss import DINOLoss


def test_peer_lightly_dino_loss(bench_case, device, smoke):
    lightly_loss = pytest.importorskip("lightly.loss", reason="lightly not installed (pip install lightly)")
    B, K, ncrops = (2, 257, 4) if smoke else (64, 65536, 12)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(ncrops * B, K, generator=g).to(device).requires_grad_()     # (ncrops*B, K)
    t = torch.randn(2 * B, K, generator=g).to(device)                           # (2*B, K)
    ours = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1).to(device)
    peer = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                 warmup_teacher_temp_epochs=0).to(device)

    def step(fn):
        def run():
            s.grad = None
            loss = fn()
            loss.backward()
            return loss.detach(), s.grad
        return run
    ours_step = step(lambda: ours(s, t, 0))
    peer_step = step(lambda: peer(list(t.chunk(2)), list(s.chunk(ncrops)), epoch=0))

    def check(out, ref):
        torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-3, atol=1e-7)
    rec = bench_case("dino_loss_vs_lightly", ours_step, peer_step, check=check,
                     **dino_loss_traffic(B, K, ncrops, elem_bytes=s.element_size()), ref_name="lightly DINOLoss",
                     B=B, K=K, ncrops=ncrops)
    assert rec["speedup"] > 0


def test_peer_timm_vit(bench_case, device, smoke):
    pytest.importorskip("timm", reason="timm not installed (pip install timm)")
    import dino_fast.model as dm
    from dino_fast.model.flops import vit_forward_flops
    from dino_fast.model.timm_interop import to_timm
    arch, patch, size, batch, depth = ("vit_tiny", 16, 32, 2, 2) if smoke else ("vit_small", 16, 224, 64, 12)
    torch.manual_seed(0)
    ours = getattr(dm, arch)(patch_size=patch, depth=depth).to(device)
    peer = to_timm(ours, img_size=size).to(device)
    assert getattr(peer.blocks[0].attn, "fused_attn", True), "timm's fused attention is off"
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    def step(model):
        return fwd_bwd_step(model, x, device)    # (B, D) CLS features
    tol = 1e-4 if device.type == "cpu" else 3e-2

    def check(out, ref):
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    flops = 3 * batch * vit_forward_flops(ours, size)
    rec = bench_case("vit_fwd_bwd_vs_timm", step(ours), step(peer), check=check, flops=flops,
                     ref_name="timm ViT (fused attention)", arch=f"{arch}/{patch}", size=size, batch=batch)
    assert rec["speedup"] > 0
