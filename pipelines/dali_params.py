"""Per-sample augmentation parameters for the DALI pipeline, drawn on the host.

The DALI graph is data-parallel over the batch; every random decision of
DINO's recipe is drawn here (numpy, one generator per sample seeded by
seed/epoch/index) and fed to the graph as argument inputs. This keeps the
crop distribution exactly torchvision's RandomResizedCrop (10 attempts, then
the central-crop fallback) and makes an epoch reproducible regardless of the
number of ranks or DALI threads. Drawing costs a few microseconds per crop.

Row layout of the (ncrops, NPARAMS) float32 array, one row per crop:
"""
from __future__ import annotations

import math

import numpy as np

from .config import AugmentConfig

# column index -> meaning
Y0, X0, Y1, X1 = 0, 1, 2, 3   # crop box in source pixels (resize roi)
FLIP = 4                      # 1: horizontal flip
JITTER = 5                    # 1: colour jitter applied (factors below are identity otherwise)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 6, 7, 8, 9   # factors; HUE in degrees
GRAY = 10                     # 1: grayscale
SIGMA = 11                    # blur sigma, 0: not blurred
SOLARIZE = 12                 # 1: solarize
HUE_POS = 13                  # jitter order, see HUE_ORDERS
NPARAMS = 14

# The reference applies brightness, contrast, saturation and hue in a uniformly random
# order. Brightness commutes with the other three and contrast with saturation (up to
# clamping), so the outcome depends only on where hue falls among contrast (c) and
# saturation (s): HUE_POS 0 = h,c,s  1 = c,h,s  2 = s,h,c  3 = c,s,h (4 = no jitter).
HUE_ORDERS = ("bhcs", "bchs", "bshc", "bcsh")
HUE_POS_P = (1 / 3, 1 / 6, 1 / 6, 1 / 3)
NO_JITTER = 4
FIXED_POS = 1                 # jitter_order="fixed": brightness, contrast, hue, saturation


def crop_boxes(rng: np.random.Generator, height: int, width: int, scales: np.ndarray,
               ratio) -> np.ndarray:
    """(ncrops, 4) int64 (top, left, h, w): torchvision's RandomResizedCrop rule (10
    attempts of area ~ U(scale) * H * W and log-uniform aspect ratio, the first that
    fits wins; else the central crop of the closest ratio), for all crops at once."""
    n = len(scales)
    area = float(height * width)
    targets = area * (scales[:, :1] + (scales[:, 1:] - scales[:, :1]) * rng.random((n, 10)))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspects = np.exp(log_lo + (log_hi - log_lo) * rng.random((n, 10)))
    ws = np.rint(np.sqrt(targets * aspects)).astype(np.int64)                # (n, 10)
    hs = np.rint(np.sqrt(targets / aspects)).astype(np.int64)
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = ok.argmax(axis=1)
    w, h = ws[np.arange(n), first], hs[np.arange(n), first]
    u = rng.random((n, 2))
    top = np.minimum((u[:, 0] * (height - h + 1)).astype(np.int64), height - h)
    left = np.minimum((u[:, 1] * (width - w + 1)).astype(np.int64), width - w)
    fit = ok.any(axis=1)
    if not fit.all():                                                         # fallback
        in_ratio = width / height
        if in_ratio < min(ratio):
            fw, fh = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            fh, fw = height, int(round(height * max(ratio)))
        else:
            fw, fh = width, height
        w, h = np.where(fit, w, fw), np.where(fit, h, fh)
        top = np.where(fit, top, (height - fh) // 2)
        left = np.where(fit, left, (width - fw) // 2)
    return np.stack([top, left, h, w], axis=1)


def draw_params(rng: np.random.Generator, height: int, width: int, cfg: AugmentConfig) -> np.ndarray:
    """All decisions for one image: (ncrops, NPARAMS) float32."""
    n = cfg.ncrops
    out = np.zeros((n, NPARAMS), dtype=np.float32)
    box = crop_boxes(rng, height, width, np.asarray(cfg.crop_scales(), dtype=np.float64), cfg.ratio)
    out[:, Y0], out[:, X0] = box[:, 0], box[:, 1]
    out[:, Y1], out[:, X1] = box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]
    u = rng.random((n, 5))
    out[:, FLIP] = u[:, 0] < cfg.flip_p
    jitter = u[:, 1] < cfg.jitter_p
    out[:, JITTER] = jitter
    lo = np.array([1 - cfg.brightness, max(0.0, 1 - cfg.contrast), max(0.0, 1 - cfg.saturation), -cfg.hue])
    hi = np.array([1 + cfg.brightness, 1 + cfg.contrast, 1 + cfg.saturation, cfg.hue])
    factors = lo + (hi - lo) * rng.random((n, 4))
    factors[~jitter] = (1.0, 1.0, 1.0, 0.0)
    factors[:, 3] *= 360.0                                                    # hue in degrees
    out[:, [BRIGHTNESS, CONTRAST, SATURATION, HUE]] = factors
    pos = np.searchsorted(np.cumsum(HUE_POS_P)[:-1], rng.random(n), side="right")
    if cfg.jitter_order == "fixed":
        pos[:] = FIXED_POS
    out[:, HUE_POS] = np.where(jitter, pos, NO_JITTER)
    out[:, GRAY] = u[:, 2] < cfg.grayscale_p
    blur = u[:, 3] < np.asarray(cfg.blur_ps())
    s_lo, s_hi = cfg.blur_sigma
    out[:, SIGMA] = np.where(blur, s_lo + (s_hi - s_lo) * rng.random(n), 0.0)
    out[1, SOLARIZE] = u[1, 4] < cfg.solarize_p                                # global 2 only
    return out
