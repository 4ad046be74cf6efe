"""Self-attention maps of the CLS token (the paper's Fig. 1/3), as the
reference visualize_attention.py, drawn with Pillow.

For an image cropped to a multiple of the patch size (or resized to one),
the last block's attention probabilities (B, heads, L, L) come from
`model.get_last_selfattention` (exact softmax probabilities whatever fused
attention backend the model runs for features). Row 0 (the CLS query), columns 1: (the patches),
reshaped to the (H/p, W/p) grid, is one heatmap per head. The thresholded
mask keeps the most-attended patches holding `threshold` (60 %) of the map's
mass: sort ascending, normalise, cumulative sum, keep > 1 - threshold,
unsort (the reference's algorithm).
"""
from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from dino_fast.eval.data import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_rgb
from dino_fast.eval.io import atomic_write

# viridis (matplotlib's default colormap, used by the reference's plt.imsave) at 9 stops
_VIRIDIS = np.array([(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
                     (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37)], dtype=np.float64)


@dataclass
class AttentionMaps:
    image: torch.Tensor        # (3, H, W) normalised input, H and W multiples of patch_size
    attentions: torch.Tensor   # (heads, H/p, W/p) CLS -> patch attention probabilities
    cls_self: torch.Tensor     # (heads,) CLS -> CLS probability (each head: attentions.sum + cls_self = 1)
    masks: torch.Tensor | None  # (heads, H/p, W/p) bool, the patches holding `threshold` of the mass
    patch_size: int
    threshold: float | None


# ---------------------------------------------------------------- maps
def prepare_image(img: Image.Image, image_size=(480, 480), patch_size: int = 16, fit: str = "crop") -> torch.Tensor:
    """Resize (one int: shorter side; two: (H, W)) and normalise, then make H
    and W multiples of the patch: fit="crop" drops the remainder (reference),
    fit="resize" resizes to the nearest multiple. Returns (3, H, W)."""
    size = list(image_size) if isinstance(image_size, (list, tuple)) else [image_size]
    size = size[0] if len(size) == 1 else tuple(size)
    x = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    h, w = x.shape[1], x.shape[2]
    if fit == "crop":
        x = x[:, :h - h % patch_size, :w - w % patch_size]
    elif fit == "resize":
        nh, nw = max(patch_size, round(h / patch_size) * patch_size), max(patch_size, round(w / patch_size) * patch_size)
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False)[0]
    else:
        raise ValueError(f"fit={fit!r}: choose 'crop' or 'resize'")
    if x.shape[1] < patch_size or x.shape[2] < patch_size:
        raise ValueError(f"image of {h}x{w} px is smaller than one {patch_size} px patch; use a larger --image_size")
    return x


def threshold_masks(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reference mask: attentions (heads, N) -> bool (heads, N) keeping the
    largest entries whose share of each row's mass is >= threshold."""
    val, idx = torch.sort(attentions, dim=1)                     # ascending
    val = val / val.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - threshold)
    return torch.zeros_like(keep_sorted).scatter_(1, idx, keep_sorted)  # unsort


@torch.no_grad()
def attention_maps(model: torch.nn.Module, image: torch.Tensor, patch_size: int,
                   threshold: float | None = 0.6) -> AttentionMaps:
    """Last-block CLS attention of one image (3, H, W) (H, W multiples of p)."""
    if image.shape[-2] % patch_size or image.shape[-1] % patch_size:
        raise ValueError(f"image {tuple(image.shape[-2:])} is not a multiple of the patch size {patch_size}; "
                         "use prepare_image")
    device = next(model.parameters()).device
    h, w = image.shape[-2] // patch_size, image.shape[-1] // patch_size
    attn = model.get_last_selfattention(image[None].to(device).float())   # (1, heads, L, L)
    if isinstance(attn, (list, tuple)):
        attn = attn[0]
    attn = attn[0].float()                                                  # (heads, L, L)
    nh = attn.shape[0]
    cls_row = attn[:, 0]                                                    # (heads, L)
    prefix = getattr(model, "num_prefix_tokens", 1)                         # CLS + registers
    patches = cls_row[:, prefix:].reshape(nh, h * w)                        # (heads, N)
    masks = None
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1] (0.6 keeps 60 % of the mass)")
        masks = threshold_masks(patches, threshold).reshape(nh, h, w).cpu()
    return AttentionMaps(image=image.cpu(), attentions=patches.reshape(nh, h, w).cpu(),
                         cls_self=cls_row[:, 0].cpu(), masks=masks, patch_size=patch_size, threshold=threshold)


# ---------------------------------------------------------------- drawing
def colormap(values: np.ndarray) -> np.ndarray:
    """viridis of values in [0, 1] -> uint8 RGB (..., 3)."""
    t = np.clip(values, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (t - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> uint8 (H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (image.float() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _upsample(grid: torch.Tensor, patch_size: int) -> np.ndarray:
    """(h, w) -> (h*p, w*p) nearest, as the reference."""
    return grid.float().repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1).numpy()


def heatmap(attention: torch.Tensor, patch_size: int) -> np.ndarray:
    """One head's (h, w) map -> uint8 RGB (H, W, 3), min-max scaled."""
    a = _upsample(attention, patch_size)
    lo, hi = a.min(), a.max()
    return colormap((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a))


def blend(base: np.ndarray, top: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (base.astype(np.float64) * (1 - alpha) + top.astype(np.float64) * alpha).round().astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, color, alpha: float = 0.5) -> np.ndarray:
    """The reference's apply_mask (colour blended inside the mask) plus the
    mask's contour drawn in the colour."""
    m = mask.astype(np.float64)[..., None]
    c = np.asarray(color, dtype=np.float64) * 255
    out = image.astype(np.float64) * (1 - alpha * m) + alpha * m * c
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[mask & ~inner] = c
    return out.round().astype(np.uint8)


def head_colors(n: int) -> list[tuple[float, float, float]]:
    return [colorsys.hsv_to_rgb(i / max(n, 1), 1.0, 1.0) for i in range(n)]


def save_png(array: np.ndarray, path: str) -> str:
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def grid_image(tiles: list[list[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Rows of equally sized tiles -> one uint8 image with white gutters."""
    h, w = tiles[0][0].shape[:2]
    cols = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            out[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = t
    return out


def save_attention_pngs(maps: AttentionMaps, output_dir: str, grid_path: str | None = None) -> list[str]:
    """Write img.png, attn-head{j}.png (heatmap), attn-overlay-head{j}.png,
    mask_th{t}_head{j}.png (when thresholded) into output_dir, and the grid
    (row 1: image + overlays, row 2: image + masks) to grid_path
    (default output_dir/grid.png). Returns the written paths."""
    os.makedirs(output_dir, exist_ok=True)
    img = to_uint8_image(maps.image)
    written = [save_png(img, os.path.join(output_dir, "img.png"))]
    nh, p = maps.attentions.shape[0], maps.patch_size
    colors = head_colors(nh)
    row_attn, row_mask = [img], [img]
    for j in range(nh):
        hm = heatmap(maps.attentions[j], p)
        ov = blend(img, hm, 0.6)
        written.append(save_png(hm, os.path.join(output_dir, f"attn-head{j}.png")))
        written.append(save_png(ov, os.path.join(output_dir, f"attn-overlay-head{j}.png")))
        row_attn.append(ov)
        if maps.masks is not None:
            mk = mask_overlay(img, _upsample(maps.masks[j], p) > 0.5, colors[j])
            written.append(save_png(mk, os.path.join(output_dir, f"mask_th{maps.threshold:g}_head{j}.png")))
            row_mask.append(mk)
    rows = [row_attn] + ([row_mask] if maps.masks is not None else [])
    written.append(save_png(grid_image(rows), grid_path or os.path.join(output_dir, "grid.png")))
    return written


def list_images(path: str) -> list[str]:
    """An image file, or every image under a folder (sorted)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such image file or folder (--image)")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{path}: no images in this folder (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files


def visualize(model: torch.nn.Module, image_path: str, output_dir: str, patch_size: int,
              image_size=(480, 480), threshold: float | None = 0.6, fit: str = "crop") -> tuple[AttentionMaps, list[str]]:
    """Maps of one image file, written to output_dir (see save_attention_pngs)."""
    x = prepare_image(load_rgb(image_path), image_size, patch_size, fit)
    maps = attention_maps(model, x, patch_size, threshold)
    return maps, save_attention_pngs(maps, output_dir)
