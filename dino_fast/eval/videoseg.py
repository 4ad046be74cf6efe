"""Video object segmentation by label propagation, as the reference
eval_video_segmentation.py (after UVC / Jabri et al.).

For each frame t > 0, with context = the first frame and the `n_last_frames`
preceding frames (their patch features f_s and soft masks m_s):

    a[s, i, j] = exp(<f_t[i], f_s[j]> / T)      unit-norm patch features, T = 0.1
               * [|row(i) - row(j)| <= r and |col(i) - col(j)| <= r]   (r = size_mask_neighborhood)
    keep, for every target patch i, the entries >= its topk-th largest over
    all (s, j), zero the rest, normalise them to sum 1 over (s, j)
    m_t[:, i] = sum_{s, j} m_s[:, j] a[s, i, j]          (C, h, w) soft mask

m_t joins the queue; the output label map is m_t upsampled bilinearly by
the patch size, each channel min-max normalised (when its max > 0), argmax,
resized to the frame's size (nearest).

Memory: the reference builds the whole (n_ctx, hw, hw) affinity and a
(n_ctx, hw, hw) float neighbourhood mask; here target patches go in chunks
(a (n_ctx * hw, chunk) block at a time) and the mask is one (hw, hw) bool.
"""
from __future__ import annotations

import collections
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

# the reference's frame normalisation (its std for red is 0.228, not 0.229)
FRAME_MEAN = (0.485, 0.456, 0.406)
FRAME_STD = (0.228, 0.224, 0.225)


def frame_size(h: int, w: int, short: int = 480, multiple: int = 64) -> tuple[int, int]:
    """The reference's (height, width) for a frame: shorter side `short`,
    longer side scaled and floored to a multiple of `multiple`."""
    if h > w:
        return int(short * h / w // multiple * multiple), short
    return short, int(short * w / h // multiple * multiple)


def prepare_frame(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised (3, h, w) float32, bilinear resize
    (half-pixel centres, no antialias: OpenCV's INTER_LINEAR, as the reference)."""
    x = torch.tensor(np.asarray(rgb)).permute(2, 0, 1).float().div_(255.0)[None]                  # a copy
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(FRAME_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FRAME_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def first_mask_onehot(mask: np.ndarray, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Indexed first-frame mask (H, W) -> one-hot (C, h, w) on the patch grid
    (nearest resize, as the reference's read_seg)."""
    from PIL import Image
    small = np.asarray(Image.fromarray(mask).resize((grid[1], grid[0]), Image.NEAREST))
    return F.one_hot(torch.from_numpy(small.astype(np.int64)), num_classes).permute(2, 0, 1).float()


def neighborhood_mask(h: int, w: int, size: int, device=None) -> torch.Tensor:
    """(h*w, h*w) bool: [i, j] when patch j is within `size` rows and
    columns of patch i (the reference's restrict_neighborhood)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= size) & ((cols[:, None] - cols[None, :]).abs() <= size)


@torch.no_grad()
def propagate(feat_tar: torch.Tensor, feat_src: torch.Tensor, seg_src: torch.Tensor, *, topk: int = 5,
              temperature: float = 0.1, mask: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
    """One propagation step.

    feat_tar (hw, D), feat_src (n, hw, D): L2-normalised patch features;
    seg_src (n, C, hw) soft masks of the sources; mask (hw, hw) bool
    [target, source] or None. Returns the target's soft mask (C, hw)."""
    n, hw_s, _ = feat_src.shape
    C = seg_src.shape[1]
    src = feat_src.reshape(n * hw_s, -1)                                    # (n*hw, D)
    segs = seg_src.permute(1, 0, 2).reshape(C, n * hw_s)                    # (C, n*hw)
    out = torch.empty(C, feat_tar.shape[0], device=feat_tar.device, dtype=torch.float32)
    for i0 in range(0, feat_tar.shape[0], chunk):
        q = feat_tar[i0:i0 + chunk]                                         # (c, D)
        aff = torch.exp(src @ q.T / temperature).float()                    # (n*hw, c)
        if mask is not None:
            aff = aff.view(n, hw_s, -1).mul_(mask[i0:i0 + chunk].T.to(aff.dtype)).view(n * hw_s, -1)
        kth = aff.topk(min(topk, aff.shape[0]), dim=0).values.min(dim=0).values   # (c,)
        aff = torch.where(aff < kth, torch.zeros((), dtype=aff.dtype, device=aff.device), aff)
        aff = aff / aff.sum(dim=0, keepdim=True)
        out[:, i0:i0 + chunk] = segs.float() @ aff                          # (C, c)
    return out


class LabelPropagation:
    """The reference's queue: the first frame always, plus the last
    `n_last_frames` predictions."""

    def __init__(self, first_feat: torch.Tensor, first_seg: torch.Tensor, *, n_last_frames: int = 7,
                 topk: int = 5, temperature: float = 0.1, size_mask_neighborhood: int = 12, chunk: int = 2048):
        h, w, _ = first_feat.shape
        if first_seg.shape[-2:] != (h, w):
            raise ValueError(f"first mask grid {tuple(first_seg.shape[-2:])} differs from the feature grid {(h, w)}")
        self.grid = (h, w)
        self.first = (F.normalize(first_feat.reshape(h * w, -1).float(), dim=1), first_seg.reshape(first_seg.shape[0], -1))
        self.queue: collections.deque = collections.deque(maxlen=n_last_frames) if n_last_frames > 0 else None
        self.topk, self.temperature, self.chunk = topk, temperature, chunk
        self.mask = (neighborhood_mask(h, w, size_mask_neighborhood, first_feat.device)
                     if size_mask_neighborhood > 0 else None)

    def step(self, feat: torch.Tensor) -> torch.Tensor:
        """Patch features (h, w, D) of the next frame -> its soft mask (C, h, w)."""
        h, w = self.grid
        if tuple(feat.shape[:2]) != (h, w):
            raise ValueError(f"frame feature grid {tuple(feat.shape[:2])} differs from the first frame's {(h, w)}")
        ctx = [self.first] + (list(self.queue) if self.queue is not None else [])
        f = F.normalize(feat.reshape(h * w, -1).float(), dim=1)
        seg = propagate(f, torch.stack([c[0] for c in ctx]), torch.stack([c[1] for c in ctx]), topk=self.topk,
                        temperature=self.temperature, mask=self.mask, chunk=self.chunk)   # (C, hw)
        if self.queue is not None:
            self.queue.append((f, seg))
        return seg.reshape(-1, h, w)


def soft_to_labels(seg: torch.Tensor, patch_size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Soft mask (C, h, w) -> label map (H, W) uint8: bilinear upsampling by
    the patch size, per-channel min-max normalisation, argmax, nearest
    resize to the frame size (the reference)."""
    from PIL import Image
    up = F.interpolate(seg[None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]                     # (C, h*p, w*p)
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    norm = torch.where(hi > 0, (up - lo) / torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi)), up)
    labels = norm.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((out_hw[1], out_hw[0]), Image.NEAREST))


def segment_video(features: Iterable[torch.Tensor], first_seg: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
    """Soft masks (C, h, w) of frames 1.. from their patch features (h, w, D)
    (frame 0's features first) and frame 0's one-hot mask (C, h, w)."""
    it = iter(features)
    prop = LabelPropagation(next(it), first_seg, **kwargs)
    for feat in it:
        yield prop.step(feat)
