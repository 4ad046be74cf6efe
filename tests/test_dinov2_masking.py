"""dino_fast.dinov2.masking against DINOv2's MaskingGenerator + collate masking
(reimplemented below as DINOv2 writes it, per-patch loops and the `random`
module), plus the properties DINOv2's numbers imply: int(B * p) masked
images, ratio bins spread over (0.1, 0.5), rectangles of aspect ratio within
[0.3, 1/0.3], never more than the target, flat indices / weights that match
the masks."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dino_fast.dinov2.masking import MaskingGenerator, sample_masks, step_rng


class RefMaskingGenerator:
    """DINOv2's dinov2/data/masking.py, as written there."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def ref_collate_masks(B, N, mask_ratio_tuple, mask_probability, mask_generator):
    """The masking lines of DINOv2's collate_data_and_cast."""
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(torch.BoolTensor(mask_generator(int(N * random.uniform(prob_min, prob_max)))))
    for i in range(n_samples_masked, B):
        masks_list.append(torch.BoolTensor(mask_generator(0)))
    random.shuffle(masks_list)
    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return collated_masks, mask_indices_list, masks_weight


@pytest.mark.parametrize("grid,B,seed", [((14, 14), 64, 0), ((16, 16), 7, 1), ((4, 4), 12, 2), ((7, 5), 9, 3)])
def test_same_masks_as_dinov2_for_the_same_random_state(grid, B, seed):
    h, w = grid
    N = h * w
    random.seed(seed)
    ref = ref_collate_masks(B, N, (0.1, 0.5), 0.5, RefMaskingGenerator(grid, max_num_patches=0.5 * N))
    random.seed(seed)
    got = sample_masks(B, grid, (0.1, 0.5), 0.5, rng=random)
    assert torch.equal(got.masks, ref[0])
    assert torch.equal(got.indices, ref[1])
    torch.testing.assert_close(got.weights, ref[2].float())
    assert got.n_masked == int(ref[0].sum())


def test_ratios_and_count_of_masked_images():
    """int(B * 0.5) images masked, the others empty; each masked image's share within its bin's
    upper bound and the shares spread over (0.1, 0.5) (ViT-L/16 at 224: 14 x 14 patches)."""
    B, N = 128, 196
    shares = []
    for it in range(5):
        mb = sample_masks(B, (14, 14), (0.1, 0.5), 0.5, rng=step_rng(0, it, 0))
        counts = mb.masks.sum(1)
        assert int((counts > 0).sum()) == B // 2
        assert int(counts.max()) <= int(0.5 * N)
        shares += (counts[counts > 0].float() / N).tolist()
    shares = np.array(shares)
    # DINOv2's generator falls short of its target when rectangles stop fitting: shares at most 0.5
    assert shares.max() <= 0.5 and shares.min() >= 4 / N - 1e-9
    assert 0.2 < shares.mean() < 0.33, shares.mean()         # targets uniform over (0.1, 0.5): mean 0.3
    assert (shares < 0.2).any() and (shares > 0.4).any()


def test_single_block_shape_is_a_rectangle_with_dinov2_aspect_range():
    """One rectangle (one `_mask` call on an empty mask, allowance 16): its bounding box is fully
    masked, area in [4 - rounding, 16] and aspect ratio in [0.3, 1/0.3] up to rounding of h and w."""
    rng = random.Random(5)
    gen = MaskingGenerator((14, 14), max_num_patches=98, rng=rng)
    for _ in range(200):
        m = np.zeros((14, 14), dtype=bool)
        assert gen._mask(m, 16) == m.sum()
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert m.sum() == h * w                     # a solid rectangle
        assert 2 <= h * w <= 16
        ar = h / w
        # h = round(sqrt(A r)), w = round(sqrt(A / r)): rounding widens the range by at most 0.5 a side
        lo = (math.sqrt(4 * 0.3) - 0.5) / (math.sqrt(4 / 0.3) + 0.5)
        assert lo <= ar <= 1 / lo


def test_indices_and_weights_match_the_masks():
    mb = sample_masks(10, (6, 6), (0.1, 0.5), 0.5, rng=random.Random(3))
    flat = mb.masks.flatten()
    assert torch.equal(mb.indices, torch.nonzero(flat).flatten())
    img = mb.indices // 36
    counts = mb.masks.sum(1).float()
    torch.testing.assert_close(mb.weights, 1.0 / counts[img])
    torch.testing.assert_close(mb.weights.sum(), torch.tensor(float((counts > 0).sum())))


def test_step_masks_are_a_function_of_seed_iteration_rank():
    a = sample_masks(8, (4, 4), rng=step_rng(1, 7, 0)).masks
    assert torch.equal(a, sample_masks(8, (4, 4), rng=step_rng(1, 7, 0)).masks)
    assert not all(torch.equal(a, sample_masks(8, (4, 4), rng=step_rng(1, 7, r)).masks) for r in (1, 2, 3))
