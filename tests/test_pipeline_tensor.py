"""The tensor backend (in-process batched multi-crop for in-memory arrays) against the
reference PIL ops given the same decisions, its decisions against the configured
probabilities, and its place in MultiCropLoader (auto for arrays, reproducible epochs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.pipelines import AugmentConfig, ArraySource, MultiCropLoader
from dino_fast.pipelines import dali_params as P
from dino_fast.pipelines.tensor_backend import augment_batch, draw_batch_params
from tests._augment_reference import errors_against_reference
from tests.test_pipeline_sources import photo


def _images(kind: str) -> np.ndarray:
    """(N, H, W, 3) RGB photos or (N, H, W) gray, uint8, different crops of real photos."""
    rgb = np.asarray(Image.fromarray(photo("astronaut")).resize((70, 52), Image.BICUBIC))
    stack = np.stack([np.roll(rgb, 7 * i, axis=1) for i in range(6)])
    return stack if kind == "rgb" else stack[..., 1].copy()


@pytest.mark.parametrize("kind", ["rgb", "gray"])
def test_tensor_pixels_match_reference_ops_given_same_decisions(kind):
    images = _images(kind)
    cfg = AugmentConfig(global_size=40, local_size=20, local_crops_number=2, blur_sigma=(0.1, 1.5))
    n = 36
    index = np.arange(n) % len(images)
    params = draw_batch_params(np.arange(n), images.shape[1], images.shape[2], cfg, seed=3, epoch=0)
    crops = augment_batch(torch.from_numpy(images[index]), params, cfg)
    for k, crop in enumerate(crops):
        assert crop.shape == (n, 3, cfg.crop_sizes()[k], cfg.crop_sizes()[k]) and crop.dtype == torch.float32
    rgb = images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=3)
    errors, seen = errors_against_reference(crops, params, lambda b: Image.fromarray(rgb[index[b]]), cfg)
    assert all(v > 0 for v in seen.values()), seen      # every op was exercised
    # 0-255 levels: PIL rounds to 8 bits after every op (hue through 8-bit HSV) and blurs with
    # box filters; a wrong box, flip or colour op gives tens of levels
    assert errors.mean() < 2.0 and errors.max() < 6.0, (errors.mean(), errors.max())


def test_decisions_follow_the_configured_probabilities():
    cfg = AugmentConfig(global_size=28, local_size=14, local_crops_number=4,
                        global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4))
    n = 1500
    p = draw_batch_params(np.arange(n), 28, 28, cfg, seed=0, epoch=0)          # (n, 6, NPARAMS)
    tol = lambda q: 4 * np.sqrt(max(q * (1 - q), 0.02) / n)                     # noqa: E731
    for col, q in ((P.FLIP, 0.5), (P.JITTER, 0.8), (P.GRAY, 0.2)):
        assert abs((p[..., col] > 0.5).mean() - q) < tol(q / 6), (col, (p[..., col] > 0.5).mean())
    for k, q in enumerate(cfg.blur_ps()):
        assert abs((p[:, k, P.SIGMA] > 0).mean() - q) < tol(q), (k, (p[:, k, P.SIGMA] > 0).mean())
    assert abs(p[:, 1, P.SOLARIZE].mean() - 0.2) < tol(0.2) and p[:, [0, 2, 3, 4, 5], P.SOLARIZE].max() == 0
    area = (p[..., P.Y1] - p[..., P.Y0]) * (p[..., P.X1] - p[..., P.X0]) / (28 * 28)
    # integer boxes: a rounded side moves the area by up to ~(2 * 28 + 1) / 28**2
    assert area[:, :2].min() > 0.4 - 0.08 and area[:, 2:].max() < 0.4 + 0.08
    assert 0.6 < area[:, :2].mean() < 0.8 and 0.2 < area[:, 2:].mean() < 0.3   # ~U(0.4, 1), ~U(0.1, 0.4)
    # the same sample of the same epoch draws the same decisions; another epoch others
    assert np.array_equal(p[:5], draw_batch_params(np.arange(5), 28, 28, cfg, seed=0, epoch=0))
    assert not np.array_equal(p[:5], draw_batch_params(np.arange(5), 28, 28, cfg, seed=0, epoch=1))


def test_loader_picks_tensor_for_arrays_reproducibly(caplog):
    import logging
    images = _images("gray")[:, :28, :28]
    source = ArraySource(np.concatenate([images] * 2), np.arange(12) % 3)
    kw = dict(batch_size=4, global_size=28, local_size=14, local_crops_number=2, device="cpu", num_workers=3)
    with caplog.at_level(logging.INFO, logger="dino_fast.pipelines.loader"):
        loader = MultiCropLoader(source, backend="auto", **kw)
    assert loader.backend == "tensor" and "backend=tensor (requested auto)" in caplog.text
    first, again = list(loader), list(loader)
    assert len(first) == 3 and [tuple(c.shape) for c in first[0][0]] == [(4, 3, 28, 28)] * 2 + [(4, 3, 14, 14)] * 2
    for (a, la), (b, lb) in zip(first, again):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(a, b))
    loader.set_epoch(1)
    assert not torch.equal(list(loader)[0][0][0], first[0][0][0])
    bf16 = MultiCropLoader(source, backend="tensor", dtype=torch.bfloat16, **kw)
    assert all(c.dtype == torch.bfloat16 for c in next(iter(bf16))[0])


def test_tensor_backend_refuses_encoded_files(tmp_path):
    from tests.test_pipeline_sources import write_photos
    write_photos(tmp_path, 2)
    with pytest.raises(ValueError, match="backend='tensor' augments in-memory arrays"):
        MultiCropLoader(tmp_path, batch_size=1, backend="tensor", device="cpu", global_size=32, local_size=16)
