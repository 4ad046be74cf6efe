"""MultiCropWrapper: backbone over all crops, then the head (reference utils.py).

The reference groups consecutive crops of equal resolution, runs the backbone
once per group, concatenates the CLS features and runs the head once. Here the
backbone gets the whole list and packs every crop into one token sequence
(VisionTransformer.pack), so each block runs once per step; `packed=False`
runs the reference's per-group loop (benchmarks, non-ViT backbones).
Output: (sum of crop batch sizes, out_dim), crop-major.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = True):
        super().__init__()
        if not getattr(backbone, "dino_headless", False):  # convnet.py removed the classifier already
            backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # no ImageNet classifier, as the reference
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = [x]
        if self.packed and hasattr(self.backbone, "pack"):
            return self.head(self.backbone(list(x)))  # (ncrops*B, out_dim)
        feats, start = [], 0
        while start < len(x):
            end = start + 1
            # the reference compares widths only (and fails on equal widths with other
            # heights); comparing (H, W) groups the same crops wherever it works
            while end < len(x) and x[end].shape[-2:] == x[start].shape[-2:]:
                end += 1
            out = self.backbone(torch.cat(x[start:end]) if end - start > 1 else x[start])
            feats.append(out[0] if isinstance(out, tuple) else out)
            start = end
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])
