"""PCA of patch features as RGB maps (the DINOv2 paper's Fig. 1 recipe).

For a set of images (their patch features pooled together, so the colours
are comparable across the set):
1. PCA of all patch features (centred; float64 eigen-decomposition of the
   D x D covariance). The first three components, each min-max scaled over
   the set, are the R, G, B of the *all-patches* map.
2. Foreground: the first component > threshold (DINOv2: "we threshold the
   first component ... keep only patches with a positive value"; default
   0). A component's sign is arbitrary: it is oriented so that the image
   borders (usually background) have the lower mean.
3. A second PCA on the foreground patches only; its three components,
   min-max scaled over the foreground, colour the foreground; the
   background is black (the *foreground* map).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def principal_components(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (D,), components (k, D) unit rows by decreasing variance,
    variances (k,)) of rows x (N, D), float64. Signs: each component's
    largest-magnitude coefficient is positive (deterministic)."""
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)                         # (D, D)
    var, vec = torch.linalg.eigh(cov)                                # ascending
    order = torch.argsort(var, descending=True)[:k]
    comps = vec[:, order].T.contiguous()                             # (k, D)
    big = comps.abs().argmax(dim=1)
    comps = comps * torch.sign(comps[torch.arange(comps.shape[0]), big])[:, None]
    return mean, comps, var[order]


def minmax(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (x - lo) / torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))


def border_mask(h: int, w: int) -> torch.Tensor:
    """(h, w) bool: the outermost ring of patches."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


@dataclass
class PCAMaps:
    rgb: list[torch.Tensor]          # per image (h, w, 3) in [0, 1]: first 3 components of all patches
    first: list[torch.Tensor]        # per image (h, w): the oriented first component (raw projection)
    foreground: list[torch.Tensor]   # per image (h, w) bool
    fg_rgb: list[torch.Tensor]       # per image (h, w, 3): second PCA on the foreground, background 0
    variance_ratio: list[float]      # share of the total variance of each of the first 3 components


def pca_maps(patches: list[torch.Tensor], threshold: float = 0.0) -> PCAMaps:
    """patches: per image (h_i, w_i, D) features (grids may differ)."""
    if not patches:
        raise ValueError("pca_maps needs at least one image")
    sizes = [p.shape[0] * p.shape[1] for p in patches]
    x = torch.cat([p.reshape(-1, p.shape[-1]).double().cpu() for p in patches])      # (N, D)
    if x.shape[0] < 4:
        raise ValueError(f"{x.shape[0]} patches in all: too few for a 3-component PCA; use larger images")
    mean, comps, var = principal_components(x, 3)
    total = float(((x - mean) ** 2).sum() / max(x.shape[0] - 1, 1))
    proj = (x - mean) @ comps.T                                                        # (N, 3)
    borders = torch.cat([border_mask(p.shape[0], p.shape[1]).reshape(-1) for p in patches])
    if borders.any() and (~borders).any() and proj[borders, 0].mean() > proj[~borders, 0].mean():
        proj[:, 0] = -proj[:, 0]                                                       # borders low
    fg = proj[:, 0] > threshold                                                        # (N,)
    rgb = minmax(proj, 0)
    fg_rgb = torch.zeros_like(proj)
    if int(fg.sum()) >= 4:
        m2, c2, _ = principal_components(x[fg], 3)
        fg_rgb[fg] = minmax((x[fg] - m2) @ c2.T, 0)
    out = PCAMaps([], [], [], [], [float(v) / total if total > 0 else 0.0 for v in var])
    for p, part in zip(patches, torch.split(torch.arange(x.shape[0]), sizes)):
        h, w = p.shape[0], p.shape[1]
        out.rgb.append(rgb[part].reshape(h, w, 3).float())
        out.first.append(proj[part, 0].reshape(h, w).float())
        out.foreground.append(fg[part].reshape(h, w))
        out.fg_rgb.append(fg_rgb[part].reshape(h, w, 3).float())
    return out


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(h, w, 3) or (h, w) in [0, 1] -> uint8 array."""
    return (rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def _tile(arr: np.ndarray, height: int, nearest: bool):
    from PIL import Image
    img = Image.fromarray(arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2))
    w = max(1, round(img.width * height / img.height))
    return img.resize((w, height), Image.NEAREST if nearest else Image.BICUBIC)


def row_image(image_rgb: np.ndarray, rgb: torch.Tensor, foreground: torch.Tensor, fg_rgb: torch.Tensor,
              height: int = 224, gap: int = 4):
    """One PIL row: input | first 3 components | foreground mask | foreground PCA."""
    from PIL import Image
    tiles = [_tile(image_rgb, height, False), _tile(to_uint8(rgb), height, True),
             _tile(to_uint8(foreground.float()), height, True), _tile(to_uint8(fg_rgb), height, True)]
    row = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), "white")
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + gap
    return row


def stack_rows(rows: list, gap: int = 4):
    """Rows (PIL images) stacked top to bottom on white."""
    from PIL import Image
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + gap
    return grid
