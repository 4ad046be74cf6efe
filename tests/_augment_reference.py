"""The reference augmentation ops (torchvision functional on PIL images) applied with given
decisions (one `dali_params` row), for the pipelines that draw their decisions first and
do the pixels elsewhere (DALI, the tensor backend)."""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

from dino_fast.pipelines import AugmentConfig
from dino_fast.pipelines import dali_params as P


def denorm(crop: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """(B,3,S,S) normalized -> [0, 1] RGB."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    return crop.float() * std + mean


def reference_with_params(image: Image.Image, row: np.ndarray, size: int) -> torch.Tensor:
    """The reference ops (torchvision functional / PIL) with the given decisions, [0, 1] RGB."""
    y0, x0, y1, x1 = (int(v) for v in row[[P.Y0, P.X0, P.Y1, P.X1]])
    im = F.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size], InterpolationMode.BICUBIC,
                        antialias=True)
    if row[P.FLIP]:
        im = F.hflip(im)
    if row[P.JITTER]:
        ops = {"b": lambda i: F.adjust_brightness(i, float(row[P.BRIGHTNESS])),
               "c": lambda i: F.adjust_contrast(i, float(row[P.CONTRAST])),
               "s": lambda i: F.adjust_saturation(i, float(row[P.SATURATION])),
               "h": lambda i: F.adjust_hue(i, float(row[P.HUE]) / 360.0)}
        for op in P.HUE_ORDERS[int(row[P.HUE_POS])]:             # the sample's jitter order
            im = ops[op](im)
    if row[P.GRAY]:
        im = F.rgb_to_grayscale(im, num_output_channels=3)
    if row[P.SIGMA] > 0:
        im = im.filter(ImageFilter.GaussianBlur(radius=float(row[P.SIGMA])))
    if row[P.SOLARIZE]:
        im = ImageOps.solarize(im, threshold=128)
    return F.to_tensor(im)


def errors_against_reference(crops, params, image_of, cfg: AugmentConfig):
    """Mean absolute error (0-255 levels) of every crop against `reference_with_params` on
    the same decisions, and how often each op was drawn. crops: ncrops x (B, 3, S, S)
    normalized; params (B, ncrops, NPARAMS) numpy; image_of(b) -> the PIL image of sample b."""
    errors, seen = [], {"flip": 0, "jitter": 0, "gray": 0, "blur": 0, "solarize": 0}
    for k, crop in enumerate(crops):
        got = denorm(crop, cfg)
        for b in range(crop.shape[0]):
            row = np.asarray(params[b, k])
            expected = reference_with_params(image_of(b), row, crop.shape[-1])
            errors.append(float((got[b] - expected).abs().mean()) * 255)
            for key, col in (("flip", P.FLIP), ("jitter", P.JITTER), ("gray", P.GRAY),
                             ("blur", P.SIGMA), ("solarize", P.SOLARIZE)):
                seen[key] += bool(row[col])
    return np.array(errors), seen
