"""The torch/torchvision reference multi-crop augmentation (PIL images).

`DataAugmentationDINO` follows the reference repo's class of the same name
(facebookresearch/dino main_dino.py + utils.GaussianBlur / utils.Solarization)
draw for draw: the same random calls in the same order, so with
`generator=None` it consumes the global torch / python RNGs exactly as the
reference transforms do, and with an explicit `torch.Generator` and
`random.Random` it is deterministic per sample without touching global state.

Per crop: RandomResizedCrop (bicubic, antialiased) -> horizontal flip ->
RandomApply(ColorJitter in a random order) -> RandomGrayscale -> GaussianBlur
(PIL, radius = sigma) -> Solarization (global 2 only) -> ToTensor + Normalize.

It is the torch backend of `MultiCropLoader` and the statistical reference
the DALI pipeline is tested against. `return_params=True` also returns the
per-crop decisions (crop box, flip, jitter, grayscale, blur sigma, solarize).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

from .config import AugmentConfig


@dataclass
class CropParams:
    """What the augmentation did to one crop (for tests and debugging)."""
    box: tuple[int, int, int, int]   # (top, left, height, width) in source pixels
    image_size: tuple[int, int]      # (height, width) of the source image
    flip: bool
    jitter: bool
    jitter_order: tuple[int, ...]    # 0 brightness, 1 contrast, 2 saturation, 3 hue
    jitter_factors: tuple[float, float, float, float]
    grayscale: bool
    blur_sigma: float                # 0.0 when not blurred
    solarize: bool

    @property
    def area_fraction(self) -> float:
        return self.box[2] * self.box[3] / (self.image_size[0] * self.image_size[1])


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=generator))


def resized_crop_params(height: int, width: int, scale, ratio,
                        generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, with an optional generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                         generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)   # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DataAugmentationDINO:
    """Reference multi-crop: PIL RGB image -> list of 2 + N normalized (3, S, S) tensors.

    Accepts the reference constructor `(global_crops_scale, local_crops_scale,
    local_crops_number)` or an `AugmentConfig` via `config=`.
    """

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                 local_crops_number: int = 8, *, config: AugmentConfig | None = None):
        if config is None:
            config = AugmentConfig(global_crops_scale=tuple(global_crops_scale),
                                   local_crops_scale=tuple(local_crops_scale),
                                   local_crops_number=local_crops_number)
        self.config = config
        self.local_crops_number = config.local_crops_number

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None,
                 rng: random.Random | None = None, return_params: bool = False):
        rng = rng if rng is not None else random   # the reference draws blur/solarize from `random`
        cfg = self.config
        crops, params = [], []
        for k, (size, scale, blur_p) in enumerate(zip(cfg.crop_sizes(), cfg.crop_scales(),
                                                      cfg.blur_ps())):
            solarize_p = cfg.solarize_p if k == 1 else None   # the transform exists on global 2 only
            tensor, p = self._one_crop(image, size, scale, blur_p, solarize_p, generator, rng)
            crops.append(tensor)
            params.append(p)
        return (crops, params) if return_params else crops

    def _one_crop(self, image, size, scale, blur_p, solarize_p, generator, rng):
        cfg = self.config
        width, height = image.size
        # RandomResizedCrop(size, scale, bicubic)
        box = resized_crop_params(height, width, scale, cfg.ratio, generator)
        img = F.resized_crop(image, *box, [size, size], InterpolationMode.BICUBIC, antialias=True)
        # RandomHorizontalFlip(p)
        flip = bool(torch.rand(1, generator=generator) < cfg.flip_p)
        if flip:
            img = F.hflip(img)
        # RandomApply([ColorJitter(b, c, s, h)], p): reference skips when p < u
        jitter = not bool(cfg.jitter_p < torch.rand(1, generator=generator))
        order, factors = (), (1.0, 1.0, 1.0, 0.0)
        if jitter:
            order = tuple(torch.randperm(4, generator=generator).tolist())
            factors = (_uniform(1 - cfg.brightness, 1 + cfg.brightness, generator),
                       _uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator),
                       _uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, generator),
                       _uniform(-cfg.hue, cfg.hue, generator))
            adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            for k in order:
                img = adjust[k](img, factors[k])
        # RandomGrayscale(p)
        gray = bool(torch.rand(1, generator=generator) < cfg.grayscale_p)
        if gray:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        # utils.GaussianBlur(p): `random.random() <= p`, radius uniform in [min, max]
        sigma = 0.0
        if rng.random() <= blur_p:
            sigma = rng.uniform(*cfg.blur_sigma)
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        # utils.Solarization(p), global 2 only: `random.random() < p`
        solarize = False
        if solarize_p is not None and rng.random() < solarize_p:
            solarize = True
            img = ImageOps.solarize(img, threshold=cfg.solarize_threshold)
        tensor = F.normalize(F.to_tensor(img), cfg.mean, cfg.std)   # (3, size, size) fp32
        return tensor, CropParams(box, (height, width), flip, jitter, order, factors, gray,
                                  sigma, solarize)
