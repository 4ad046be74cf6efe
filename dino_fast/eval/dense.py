"""Token features of the last block, as the reference dense evaluations read
them (`model.get_intermediate_layers(x, n=1)[0]`: the last block's output
after the final norm): the CLS token and the patch tokens on their grid.

Extra tokens between CLS and the patches (register / storage tokens of
DINOv2/v3-style backbones) are skipped: the patch tokens are the last
(H/p)(W/p) tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_size_of(model: torch.nn.Module) -> int:
    p = model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def grid_of(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """Patch grid (h, w) of images (B, 3, H, W): the patch convolution drops
    a remainder smaller than one patch."""
    p = patch_size_of(model)
    return images.shape[-2] // p, images.shape[-1] // p


def last_tokens(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls (B, D), patches (B, h, w, D)) of the last block (normalised)."""
    h, w = grid_of(model, images)
    tokens = model.get_intermediate_layers(images, n=1)[0]            # (B, 1 + extra + h*w, D)
    if tokens.shape[1] < 1 + h * w:
        raise RuntimeError(f"the model gave {tokens.shape[1]} tokens for a {h}x{w} patch grid")
    patches = tokens[:, tokens.shape[1] - h * w:]                       # (B, h*w, D)
    return tokens[:, 0], patches.reshape(tokens.shape[0], h, w, tokens.shape[-1])


def gem(patches: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over the grid: patches (B, h, w, D) -> (B, D),
    (mean clamp(x, eps)^p)^(1/p) (the reference copy detection: p = 4)."""
    return patches.float().clamp(min=eps).pow(p).mean(dim=(1, 2)).pow(1.0 / p)


def cls_gem_features(model: torch.nn.Module, images: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """[CLS | GeM(patches)] (B, 2D): the reference eval_copy_detection.py features."""
    cls, patches = last_tokens(model, images)
    return torch.cat((cls.float(), gem(patches, p)), dim=1)


MULTISCALE = (1.0, 1 / 2 ** 0.5, 0.5)


def multiscale_cls(model: torch.nn.Module, images: torch.Tensor, scales=MULTISCALE) -> torch.Tensor:
    """Mean CLS feature over bilinear rescalings of the input (the
    reference utils.multi_scale; the caller L2-normalises each row)."""
    out = None
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        f = model(x).float()
        out = f if out is None else out + f
    return out / len(scales)
