"""The DALI multi-crop graph: decode once, crop and augment N times.

Per image: external source (encoded bytes from the host reader, label,
(ncrops, NPARAMS) decisions from `dali_params`) -> decode ("mixed" = nvJPEG on
the GPU, "cpu" on the host; EXIF orientation ignored, like the reference's PIL
path) -> for every crop:
  resize of the crop box to S x S (cubic, antialiased)           # RandomResizedCrop
  x * b ; c * x + (1 - c) * mean_gray(x)  (clamped to [0, 255])  # brightness, contrast
  hsv(saturation * (1 - gray)) ; HSV hue rotation (arithmetic)   # saturation, grayscale, hue
  if sigma > 0: gaussian_blur(sigma)                              # conditional: only those samples
  x + solarize * (x >= 128) * (255 - 2x)                          # solarization (global 2)
  crop_mirror_normalize(mirror=flip, mean*255, std*255) -> CHW fp32/fp16
Jitter runs in a fixed order (brightness, contrast, saturation, hue) where the
reference draws a random order; the factors and probabilities are the same.

This module must stay a real source file: DALI's conditionals
(`enable_conditionals=True`) rewrite the function from its source code.
"""
from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from . import dali_params as P
from .config import AugmentConfig

GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601 luma, as PIL's convert("L")


def _hue_shift(x, shift):
    """HSV hue rotation by `shift` (fraction of the circle), keeping V and S as
    PIL's HSV round trip in torchvision's adjust_hue does. x: (H, W, 3) float."""
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    mx = dmath.max(dmath.max(r, g), b)
    c = mx - dmath.min(dmath.min(r, g), b)                             # chroma
    safe = c + fn.cast(c <= 0.0, dtype=types.FLOAT)
    is_r = fn.cast(mx == r, dtype=types.FLOAT)
    is_g = fn.cast(mx == g, dtype=types.FLOAT) * (1.0 - is_r)
    h = (is_r * ((g - b) / safe) + is_g * ((b - r) / safe + 2.0)
         + (1.0 - is_r - is_g) * ((r - g) / safe + 4.0) + 6.0 * shift)  # hue in sextants
    channels = []
    for n in (5.0, 3.0, 1.0):                                            # R, G, B
        k = h + n
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))                      # mod 6
        channels.append(mx - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.reshape(fn.stack(*channels, axis=2), layout="HWC")    # stack drops the layout


def _augment_crop(image, params, k: int, size: int, cfg: AugmentConfig, on_gpu: bool, half: bool):
    row = params[k]                                                   # (NPARAMS,) on the host
    roi_start = fn.stack(row[P.Y0], row[P.X0])
    roi_end = fn.stack(row[P.Y1], row[P.X1])
    crop = fn.resize(image, roi_start=roi_start, roi_end=roi_end, size=[size, size],
                     interp_type=types.INTERP_CUBIC, antialias=True)   # (S, S, 3) uint8
    x = fn.cast(crop, dtype=types.FLOAT)
    to_dev = (lambda v: v.gpu()) if on_gpu else (lambda v: v)
    b, c = to_dev(row[P.BRIGHTNESS]), to_dev(row[P.CONTRAST])
    x = dmath.clamp(x * b, 0.0, 255.0)
    channel_mean = fn.reductions.mean(x, axes=[0, 1])                   # (3,)
    gray_mean = (channel_mean[0] * GRAY_WEIGHTS[0] + channel_mean[1] * GRAY_WEIGHTS[1]
                 + channel_mean[2] * GRAY_WEIGHTS[2])
    x = dmath.clamp(x * c + gray_mean * (1.0 - c), 0.0, 255.0)
    x = _hue_shift(x, to_dev(row[P.HUE] * (1.0 / 360.0)))
    saturation = row[P.SATURATION] * (1.0 - row[P.GRAY])             # grayscale = saturation 0
    x = fn.hsv(x, saturation=saturation, dtype=types.FLOAT)          # blend with luma
    sigma = row[P.SIGMA]
    if sigma > 0.0:
        x = fn.gaussian_blur(x, sigma=sigma)
    else:
        x = x
    x = dmath.clamp(x, 0.0, 255.0)
    solarize = to_dev(row[P.SOLARIZE])
    x = x + solarize * (x >= float(cfg.solarize_threshold)) * (255.0 - 2.0 * x)
    return fn.crop_mirror_normalize(
        x, mirror=fn.cast(row[P.FLIP], dtype=types.INT32),
        mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std],
        output_layout="CHW", dtype=types.FLOAT16 if half else types.FLOAT)   # (3, S, S)


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(source, cfg: AugmentConfig, device: str, encoded: bool, half: bool = False):
    """Outputs: crop_0 ... crop_{n-1}, labels, params."""
    data, labels, params = fn.external_source(source=source, num_outputs=3, batch=True,
                                              batch_info=True, dtype=[types.UINT8, types.INT64, types.FLOAT],
                                              ndim=[1 if encoded else 3, 0, 2])
    on_gpu = device == "gpu"
    if encoded:
        image = fn.decoders.image(data, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)            # (H, W, 3) uint8
    else:
        image = data.gpu() if on_gpu else data
    crops = [_augment_crop(image, params, k, size, cfg, on_gpu, half)
             for k, size in enumerate(cfg.crop_sizes())]
    return (*crops, labels, params)
