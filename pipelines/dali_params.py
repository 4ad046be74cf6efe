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
NPARAMS = 13


def crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop sampling rule, numpy RNG."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    targets = area * rng.uniform(scale[0], scale[1], size=10)
    aspects = np.exp(rng.uniform(log_lo, log_hi, size=10))
    ws = np.rint(np.sqrt(targets * aspects)).astype(np.int64)
    hs = np.rint(np.sqrt(targets / aspects)).astype(np.int64)
    ok = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
    if ok.size:
        w, h = int(ws[ok[0]]), int(hs[ok[0]])
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height     # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(rng: np.random.Generator, height: int, width: int, cfg: AugmentConfig) -> np.ndarray:
    """All decisions for one image: (ncrops, NPARAMS) float32."""
    out = np.zeros((cfg.ncrops, NPARAMS), dtype=np.float32)
    for k, (scale, blur_p) in enumerate(zip(cfg.crop_scales(), cfg.blur_ps())):
        top, left, h, w = crop_box(rng, height, width, scale, cfg.ratio)
        u = rng.random(6)
        jitter = u[1] < cfg.jitter_p
        row = out[k]
        row[[Y0, X0, Y1, X1]] = (top, left, top + h, left + w)
        row[FLIP] = u[0] < cfg.flip_p
        row[JITTER] = jitter
        row[[BRIGHTNESS, CONTRAST, SATURATION, HUE]] = (1.0, 1.0, 1.0, 0.0)
        if jitter:
            row[BRIGHTNESS] = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
            row[CONTRAST] = rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
            row[SATURATION] = rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)
            row[HUE] = 360.0 * rng.uniform(-cfg.hue, cfg.hue)
        row[GRAY] = u[2] < cfg.grayscale_p
        if u[3] < blur_p:
            row[SIGMA] = rng.uniform(*cfg.blur_sigma)
        row[SOLARIZE] = k == 1 and u[4] < cfg.solarize_p
    return out
