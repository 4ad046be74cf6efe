"""Typed configuration of DINO's multi-crop augmentation.

Defaults are the reference recipe (facebookresearch/dino, main_dino.py,
`DataAugmentationDINO`): 2 global crops at 224 px (scale 0.4-1.0), N local
crops at 96 px (scale 0.05-0.4), both bicubic; flip p=0.5; ColorJitter(0.4,
0.4, 0.2, 0.1) p=0.8; grayscale p=0.2; Gaussian blur sigma 0.1-2.0 with
p=1.0 / 0.1 / 0.5 (global 1 / global 2 / locals); solarization (threshold 128)
p=0.2 on global 2 only; ImageNet mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Every size, scale, count and probability of the multi-crop recipe."""
    global_size: int = 224
    """Side of the two global crops, pixels."""
    local_size: int = 96
    """Side of the local crops, pixels."""
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    """Range of the global crop's area as a fraction of the image area."""
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    """Range of the local crop's area as a fraction of the image area."""
    local_crops_number: int = 8
    """Number of local crops per image (paper's best: 10)."""
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """Range of the crop's aspect ratio (width / height), sampled log-uniformly."""
    flip_p: float = 0.5
    """Probability of a horizontal flip, every crop."""
    jitter_p: float = 0.8
    """Probability of applying color jitter, every crop."""
    brightness: float = 0.4
    """Brightness factor drawn from [1 - b, 1 + b]."""
    contrast: float = 0.4
    """Contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = 0.2
    """Saturation factor drawn from [1 - s, 1 + s]."""
    hue: float = 0.1
    """Hue shift drawn from [-h, h] (fraction of the hue circle)."""
    grayscale_p: float = 0.2
    """Probability of converting to 3-channel grayscale, every crop."""
    blur_p_global1: float = 1.0
    """Gaussian blur probability on global crop 1."""
    blur_p_global2: float = 0.1
    """Gaussian blur probability on global crop 2."""
    blur_p_local: float = 0.5
    """Gaussian blur probability on each local crop."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's sigma (PIL's radius in the reference), pixels."""
    solarize_p: float = 0.2
    """Probability of solarization on global crop 2 (never on the other crops)."""
    solarize_threshold: int = 128
    """Pixels >= threshold (0-255) are inverted by solarization."""
    jitter_order: str = "random"
    """DALI backend: "random" applies the four jitter ops in the reference's random order
    (per-sample conditionals); "fixed" always uses brightness, contrast, hue, saturation
    (one of the reference's orders; about 1.7x faster on the CPU). The torch reference is
    always random."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name in ("global_crops_scale", "local_crops_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentConfig.{name}={(lo, hi)!r}: need 0 < low <= high")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p_global1", "blur_p_global2",
                     "blur_p_local", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AugmentConfig.{name}={p!r}: a probability must lie in [0, 1]")
        if self.jitter_order not in ("random", "fixed"):
            raise ValueError(f"AugmentConfig.jitter_order={self.jitter_order!r}: choose 'random' or 'fixed'")
        if self.local_crops_number < 0 or self.global_size < 1 or self.local_size < 1:
            raise ValueError("AugmentConfig: sizes must be >= 1 and local_crops_number >= 0")

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def crop_sizes(self) -> list[int]:
        """Output side of every crop, in order: global 1, global 2, locals."""
        return [self.global_size] * 2 + [self.local_size] * self.local_crops_number

    def crop_scales(self) -> list[tuple[float, float]]:
        return [self.global_crops_scale] * 2 + [self.local_crops_scale] * self.local_crops_number

    def blur_ps(self) -> list[float]:
        return [self.blur_p_global1, self.blur_p_global2] + [self.blur_p_local] * self.local_crops_number

    def solarize_ps(self) -> list[float]:
        return [0.0, self.solarize_p] + [0.0] * self.local_crops_number
