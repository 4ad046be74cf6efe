"""DINOv3's Gram anchoring (dinov3/loss/gram_loss.py and the Gram teacher of
dinov3/train/ssl_meta_arch.py): the student's patch features are pulled
towards the patch-to-patch similarity structure of a frozen earlier teacher.

    G(X) = X̂ X̂ᵀ,  X̂ = rows of X L2-normalised,  loss = mean((G(S) - G(T))²)

per image (img_level: X = one image's (N, D) patches, the mean over all B·N·N
entries) or over the local batch (X = all (B·N, D) patches), S the student's
global-crop patch tokens (after the final norm, masked input as in DINOv3), T
the Gram teacher's. The Gram teacher is a frozen backbone, copied from the
EMA teacher at iteration `gram_it_first_update` and refreshed every
`gram_update_frequency` iterations (at most `gram_max_updates` times), as
DINOv3's `update_gram`. It may see the global crops at a higher resolution
(`gram_teacher_size`: the crops are resized bicubic here; DINOv3 crops the
original image at that size) and its patch features are resized bicubic to
the student's grid (DINOv3's global_teacher_resize_method, no antialias).
The weight follows a schedule (param_groups.build_schedules: gram_weight).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, img_level: bool = True) -> torch.Tensor:
    """MSE between the Gram matrices of the L2-normalised patch features, fp32.
    student_patches / teacher_patches: (B, N, D)."""
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(teacher_patches.float(), dim=-1)
    if not img_level:
        s, t = s.flatten(0, 1), t.flatten(0, 1)             # (B*N, D)
    gs = torch.matmul(s, s.transpose(-1, -2))              # (B, N, N) or (B*N, B*N)
    gt = torch.matmul(t, t.transpose(-1, -2))
    return F.mse_loss(gs, gt)


def resize_patches(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(R, h*w, D) patch features on a (h, w) grid -> (R, H*W, D) on `size`, bicubic (DINOv3)."""
    if tuple(grid) == tuple(size):
        return patches
    r, _, d = patches.shape
    x = patches.transpose(1, 2).reshape(r, d, *grid)
    x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False).to(patches.dtype)
    return x.flatten(2).transpose(1, 2)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class GramAnchor:
    """The Gram teacher and when it is refreshed. Not an nn.Module attribute of the objective:
    its weights are a function of the EMA teacher's, so checkpoints leave it out and a resumed
    run copies it afresh from the teacher (see `refresh_due`)."""

    def __init__(self, gram_teacher: nn.Module, cfg):
        self.net = gram_teacher.eval()
        for p in self.net.parameters():
            p.requires_grad = False
        self.first = cfg.gram_it_first_update
        self.every = cfg.gram_update_frequency
        self.max_updates = cfg.gram_max_updates
        self.size = cfg.gram_teacher_size or cfg.global_size
        self.patch = cfg.patch_size
        self.img_level = cfg.gram_img_level
        self.loaded = False

    def active(self, it: int) -> bool:
        return it >= self.first

    def refresh_due(self, it: int) -> bool:
        """Copy from the EMA teacher before step `it`: the first copy at `first`, then every `every`
        iterations up to max_updates refreshes; also the first active step of a resumed run."""
        if it < self.first:
            return False
        k, r = divmod(it - self.first, self.every)
        scheduled = r == 0 and (self.max_updates == 0 or k <= self.max_updates)
        return scheduled or not self.loaded

    @torch.no_grad()
    def refresh(self, teacher_backbone: nn.Module) -> None:
        """Gram teacher <- EMA teacher backbone (local shards: both are sharded alike)."""
        dst = [_local(p) for p in self.net.backbone.parameters()]
        src = [_local(p) for p in teacher_backbone.parameters()]
        torch._foreach_copy_(dst, src)
        self.loaded = True
        log.info("Gram teacher refreshed from the EMA teacher")

    @torch.no_grad()
    def targets(self, global_crops: list[torch.Tensor], student_grid: tuple[int, int]) -> torch.Tensor:
        """The Gram teacher's patch features of the global crops on the student's grid, (R, N, D)."""
        x = torch.cat(global_crops)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        feats = self.net(x)                                # (R, Ng, D)
        g = self.size // self.patch
        return resize_patches(feats, (g, g), student_grid)
