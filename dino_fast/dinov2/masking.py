"""DINOv2's block-wise masks for the iBOT loss (dinov2/data/masking.py's
`MaskingGenerator` and the masking part of dinov2/data/collate.py), drawn on
the host from a seeded `random.Random`, so a step's masks depend only on
(seed, iteration, rank) and a resumed run draws the same ones.

One image's mask: while fewer than the target number of patches are masked,
add a rectangle of area U(min_num_patches, min(left, max_num_patches)) and
aspect ratio exp(U(log 0.3, log 1/0.3)) at a uniform position (up to 10 tries
per rectangle, each needing 0 < new patches <= the allowance); stop when a
rectangle adds nothing. A batch of B global-crop images: int(B * p) of them
get a target share U(r_i, r_{i+1}) of the N patches, r = linspace(min, max,
n + 1) (so the shares cover the range evenly), the rest none; the list is
shuffled. The same random calls in the same order and the same float32 ratio
bins as DINOv2, so with the same `random` state the masks are DINOv2's.

The result carries what the step needs on the device, made here on the host
so the step has no boolean indexing (no host sync): the flat indices of the
masked patches (image-major, DINOv2's `mask_indices_list`) and each masked
patch's weight 1 / (masked patches of its image) (DINOv2's `masks_weight`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch


class MaskingGenerator:
    """DINOv2's `MaskingGenerator(input_size, num_masking_patches=None, min_num_patches=4,
    max_num_patches=None, min_aspect=0.3, max_aspect=None)`; `rng` is the `random.Random`
    to draw from (default: the `random` module, as DINOv2)."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches: int = 4, max_num_patches=None,
                 min_aspect: float = 0.3, max_aspect=None, rng: random.Random | None = None):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng if rng is not None else random

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """Add one rectangle (up to 10 tries); returns the number of newly masked patches."""
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]          # a view
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:                   # the rectangle adds patches, within the allowance
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """(height, width) bool mask with about num_masking_patches True (never more)."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            allowance = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, allowance)
            if delta == 0:
                break
            count += delta
        return mask


@dataclass
class MaskBatch:
    """The masks of a step's global-crop images, crop-major rows like the packed student."""
    masks: torch.Tensor       # (n_images, N) bool
    indices: torch.Tensor     # (n_masked,) int64: flat indices into (n_images * N) of the masked patches
    weights: torch.Tensor     # (n_masked,) fp32: 1 / (masked patches of the patch's image)
    n_masked: int             # host int (known on the host: the masks are drawn there)

    def to(self, device: torch.device) -> "MaskBatch":
        if device.type == "cpu":
            return self
        move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return MaskBatch(move(self.masks), move(self.indices), move(self.weights), self.n_masked)


def sample_masks(n_images: int, grid: tuple[int, int], mask_ratio_min_max=(0.1, 0.5),
                 mask_sample_probability: float = 0.5, generator: MaskingGenerator | None = None,
                 rng: random.Random | None = None) -> MaskBatch:
    """DINOv2's collate masking for n_images images of a (h, w) patch grid (the generator
    defaults to DINOv2's: max_num_patches = 0.5 * N)."""
    rng = rng if rng is not None else random
    h, w = grid
    n = h * w
    if generator is None:
        generator = MaskingGenerator((h, w), max_num_patches=0.5 * n, rng=rng)
    n_masked_images = int(n_images * mask_sample_probability)
    probs = torch.linspace(*mask_ratio_min_max, n_masked_images + 1)       # float32, as DINOv2
    masks = [generator(int(n * rng.uniform(probs[i], probs[i + 1]))) for i in range(n_masked_images)]
    masks += [generator(0) for _ in range(n_masked_images, n_images)]
    rng.shuffle(masks)
    flat = np.stack(masks).reshape(n_images, n) if masks else np.zeros((0, n), dtype=bool)
    counts = flat.sum(1)
    indices = np.flatnonzero(flat)
    weights = (1.0 / np.maximum(counts, 1))[indices // n] if n else np.zeros(0)
    return MaskBatch(torch.from_numpy(flat), torch.from_numpy(indices.astype(np.int64)),
                     torch.from_numpy(weights.astype(np.float32)), int(indices.size))


def step_rng(seed: int, it: int, rank: int) -> random.Random:
    """The host RNG of one step's masks: a function of (seed, iteration, rank) only."""
    return random.Random(f"dinov2-masks/{seed}/{it}/{rank}")
