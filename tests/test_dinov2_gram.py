"""DINOv3's Gram anchoring (dino_fast.dinov2.gram) against plain loops in
float64: the MSE of the L2-normalised patch Gram matrices per image and over
the batch, the bicubic resize of the Gram teacher's features to the
student's grid, and when the Gram teacher is refreshed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dino_fast.dinov2.gram import GramAnchor, gram_loss, resize_patches
from dino_fast.train.presets import resolve


def _gram_ref(s, t, img_level):
    s, t = s.double(), t.double()
    if img_level:
        total, count = 0.0, 0
        for b in range(s.shape[0]):
            a = s[b] / s[b].norm(dim=-1, keepdim=True)
            c = t[b] / t[b].norm(dim=-1, keepdim=True)
            for i in range(a.shape[0]):
                for j in range(a.shape[0]):
                    total += float((a[i] @ a[j] - c[i] @ c[j]) ** 2)
                    count += 1
        return total / count
    a = s.flatten(0, 1)
    a = a / a.norm(dim=-1, keepdim=True)
    c = t.flatten(0, 1)
    c = c / c.norm(dim=-1, keepdim=True)
    return float(((a @ a.T - c @ c.T) ** 2).mean())


def test_gram_loss_matches_plain_formula():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 5), torch.randn(3, 7, 5) * 4 + 1
    for img_level in (True, False):
        got = gram_loss(s, t, img_level=img_level)
        assert abs(float(got) - _gram_ref(s, t, img_level)) < 1e-6
    assert float(gram_loss(s, 3 * s)) < 1e-12                 # scale-invariant: normalised features
    s.requires_grad_()
    gram_loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_resize_patches_is_bicubic_on_the_grid():
    x = torch.randn(2, 8 * 8, 6)
    out = resize_patches(x, (8, 8), (4, 4))
    ref = F.interpolate(x.transpose(1, 2).reshape(2, 6, 8, 8), size=(4, 4), mode="bicubic",
                        align_corners=False).reshape(2, 6, 16).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert resize_patches(x, (8, 8), (8, 8)) is x


def test_refresh_schedule():
    cfg = resolve(None, dict(method="dinov2", device="cpu", gram_loss_weight=1.0, gram_it_first_update=10,
                             gram_update_frequency=5, gram_max_updates=2))
    anchor = GramAnchor(torch.nn.Sequential(), cfg)
    assert not anchor.active(9) and anchor.active(10)
    anchor.loaded = True
    due = [it for it in range(40) if anchor.refresh_due(it)]
    assert due == [10, 15, 20]                                 # the first copy, then 2 refreshes
    anchor.loaded = False                                      # a resumed run copies at its first active step
    assert anchor.refresh_due(23)
