"""tensor backend of MultiCropLoader: DINO's multi-crop recipe on batched tensors, in the
training process, for in-memory sources (`ArraySource`).

The torch backend runs the PIL reference in DataLoader worker processes. On a small CPU
machine those workers compete with the training step's compute threads for the same cores
(2 workers + 2 intra-op threads on 2 cores: every parallel op of the step waits for a
descheduled thread), and PIL spends more time per image than the demo's tiny ViT does.
Here the images are already decoded (uint8 arrays), so one batch is augmented with a
handful of tensor ops between two steps, with no worker process at all.

Every random decision is drawn exactly as for the DALI backend (`dali_params.draw_params`,
one numpy generator per sample seeded by seed / epoch / index: torchvision's
RandomResizedCrop rule, flip, jitter factors and order, grayscale, blur sigma,
solarization), so the distributions are the reference's and an epoch is reproducible.
The pixel ops follow the reference's PIL ones, per sample, batched:
- crop + resize: bicubic with antialiasing (torch's resize, which matches PIL's filter),
  rounded to 8 bits as PIL's output is;
- colour jitter: brightness (scale), contrast (blend with the mean luma), saturation (blend
  with the luma) and hue (HSV rotation) in the sample's order, clamped to [0, 255] after
  each op as PIL's 8-bit images are;
- grayscale: ITU-R 601 luma in all three channels (PIL's convert("L"));
- Gaussian blur: a true Gaussian of the drawn sigma, edges replicated (PIL's GaussianBlur
  is a box-filter approximation of it with the same sigma);
- solarization (global crop 2 only): pixels >= threshold become 255 - pixel;
- ImageNet normalisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import dali_params as P
from .config import AugmentConfig
from .sampling import sample_seed

GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601 luma, as PIL's convert("L")


def draw_batch_params(indices, height: int, width: int, cfg: AugmentConfig, seed: int,
                      epoch: int) -> np.ndarray:
    """(B, ncrops, NPARAMS) float32: every decision of each sample (dali_params layout)."""
    return np.stack([P.draw_params(np.random.default_rng(sample_seed(seed, epoch, int(i))), height, width, cfg)
                     for i in indices])


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W)."""
    w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _col(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) -> (B, 1, 1, 1) on like's device and dtype."""
    return torch.as_tensor(np.asarray(values, dtype=np.float32), device=like.device).to(like.dtype).view(-1, 1, 1, 1)


def crop_resize(images: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Per sample: crop `boxes[b] = (y0, x0, y1, x1)` of images (B, 3, H, W) float 0-255 and
    resize it to (size, size), bicubic with antialiasing, rounded and clamped to 8 bits."""
    out = images.new_empty((images.shape[0], 3, size, size))
    for b, (y0, x0, y1, x1) in enumerate(boxes.astype(np.int64)):
        crop = images[b:b + 1, :, y0:y1, x0:x1]
        out[b:b + 1] = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                                     antialias=True) if crop.shape[-2:] != (size, size) else crop
    return out.clamp_(0.0, 255.0).round_()


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """HSV hue rotation by `shift` (B, 1, 1, 1), a fraction of the circle; V and S kept."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    mx = torch.maximum(torch.maximum(r, g), b)
    c = mx - torch.minimum(torch.minimum(r, g), b)                  # chroma
    safe = torch.where(c > 0, c, torch.ones_like(c))
    is_r = mx == r
    is_g = (mx == g) & ~is_r
    h = torch.where(is_r, (g - b) / safe, torch.where(is_g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = h + 6.0 * shift                                             # hue in sextants
    channels = []
    for n in (5.0, 3.0, 1.0):                                       # R, G, B
        k = torch.remainder(h + n, 6.0)
        channels.append(mx - c * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.cat(channels, dim=1)


def _contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    mean = _luma(x).mean(dim=(2, 3), keepdim=True)
    return (x * c + mean * (1.0 - c)).clamp_(0.0, 255.0)


def _saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x * s + _luma(x) * (1.0 - s)).clamp_(0.0, 255.0)


def colour_jitter(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Brightness, then contrast / saturation / hue in each sample's order (rows (B, NPARAMS);
    identity factors where the sample has no jitter). Brightness commutes with the other
    three and contrast with saturation (up to clamping), so the order is the hue's position
    (dali_params.HUE_ORDERS)."""
    x = (x * _col(rows[:, P.BRIGHTNESS], x)).clamp_(0.0, 255.0)
    contrast, saturation = _col(rows[:, P.CONTRAST], x), _col(rows[:, P.SATURATION], x)
    shift = _col(rows[:, P.HUE] / 360.0, x)
    pos = rows[:, P.HUE_POS].astype(np.int64)
    out = x.clone()
    for p, order in enumerate(P.HUE_ORDERS):
        sel = np.flatnonzero(pos == p)
        if len(sel) == 0:
            continue
        idx = torch.as_tensor(sel, device=x.device)
        y = x[idx]
        for op in order[1:]:                                        # brightness is done
            if op == "c":
                y = _contrast(y, contrast[idx])
            elif op == "s":
                y = _saturation(y, saturation[idx])
            else:
                y = hue_shift(y, shift[idx])
        out[idx] = y
    return out


def gaussian_blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian of per-sample `sigma` (B,) (0: unchanged), edges replicated."""
    if not (sigma > 0).any():
        return x
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(np.maximum(sigma, 1e-6), dtype=x.dtype, device=x.device).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = torch.where(torch.as_tensor(sigma > 0, device=x.device).view(-1, 1), k, (t == 0).to(x.dtype))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)   # (B*3, 2r+1)
    n, _, h, w = x.shape
    y = F.pad(x.reshape(1, n * 3, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * 3, 1, 1, -1), groups=n * 3)
    y = F.conv2d(y, k.view(n * 3, 1, -1, 1), groups=n * 3)
    return y.view(n, 3, h, w)


def augment_crop(images: torch.Tensor, rows: np.ndarray, size: int, cfg: AugmentConfig) -> torch.Tensor:
    """One crop of every sample: images (B, 3, H, W) float 0-255, rows (B, NPARAMS) -> (B, 3, S, S)
    normalised float32."""
    x = crop_resize(images, rows[:, [P.Y0, P.X0, P.Y1, P.X1]], size)
    flip = torch.as_tensor(rows[:, P.FLIP] > 0.5, device=x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    x = colour_jitter(x, rows)
    gray = torch.as_tensor(rows[:, P.GRAY] > 0.5, device=x.device).view(-1, 1, 1, 1)
    x = torch.where(gray, _luma(x).expand_as(x), x)
    x = gaussian_blur(x, rows[:, P.SIGMA]).clamp_(0.0, 255.0)
    solarize = torch.as_tensor(rows[:, P.SOLARIZE] > 0.5, device=x.device).view(-1, 1, 1, 1)
    x = torch.where(solarize & (x >= float(cfg.solarize_threshold)), 255.0 - x, x)
    mean = x.new_tensor(cfg.mean).view(1, 3, 1, 1) * 255.0
    std = x.new_tensor(cfg.std).view(1, 3, 1, 1) * 255.0
    return (x - mean) / std


def augment_batch(images: torch.Tensor, params: np.ndarray, cfg: AugmentConfig) -> list[torch.Tensor]:
    """images uint8 (B, H, W) or (B, H, W, 3), params (B, ncrops, NPARAMS) -> 2 + N crops
    (B, 3, S, S) float32, normalised."""
    x = images.float()
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return [augment_crop(x, params[:, k], size, cfg) for k, size in enumerate(cfg.crop_sizes())]


class TensorMultiCrop:
    """`epoch(indices, epoch)` yields (crops, labels, skipped=[]) for an in-memory source."""

    def __init__(self, loader):
        source = loader.source
        if source.encoded or not hasattr(source, "images"):
            raise ValueError(f"backend='tensor' augments in-memory arrays (ArraySource); {source!r} holds "
                             "encoded files: use backend='torch' or 'dali'")
        self.images = torch.from_numpy(np.ascontiguousarray(source.images))   # uint8, host
        self.labels = torch.from_numpy(source.labels)
        self.cfg, self.seed = loader.config, loader.seed
        self.batch_size, self.drop_last = loader.batch_size, loader.drop_last
        self.device, self.dtype = loader.device, loader.dtype

    def epoch(self, indices: np.ndarray, epoch: int):
        h, w = self.images.shape[1:3]
        stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
        for start in range(0, stop, self.batch_size):
            batch = indices[start:start + self.batch_size]
            params = draw_batch_params(batch, h, w, self.cfg, self.seed, epoch)
            idx = torch.from_numpy(np.asarray(batch, dtype=np.int64))
            crops = augment_batch(self.images[idx].to(self.device), params, self.cfg)
            yield [c.to(self.dtype) for c in crops], self.labels[idx].to(self.device), []
