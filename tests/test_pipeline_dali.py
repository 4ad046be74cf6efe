"""DALI pipeline (CPU, device_id=None) against the torch reference pipeline.

- every crop's shape / dtype / value range, both backends, fp32 and bf16;
- DALI pixels vs torchvision/PIL ops applied with the same decisions;
- both DALI front ends: reader="host" (decisions drawn on the host) and
  reader="native" (fn.readers.file, decisions drawn in the graph);
- per-op rates measured from the pixels (each op alone, on a known photo whose
  crop box is the whole image): flip, jitter, grayscale, blur, solarization
  close to the configured probability in both backends; solarization never on
  global 1 or the locals; crop areas inside the scale range in both backends.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.pipelines import AugmentConfig, DataAugmentationDINO, MultiCropLoader
from dino_fast.pipelines import dali_params as P
from dino_fast.pipelines.dali_backend import DaliMultiCrop
from tests._augment_reference import denorm, errors_against_reference
from tests.test_pipeline_sources import SMALL, photo, write_photos

pytest.importorskip("nvidia.dali")

ALL_OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
               blur_p_local=0.0, solarize_p=0.0)


def dali_batches(paths, batch_size, reader="host", **cfg):
    """(crops, labels, skipped, params) from the DALI CPU pipeline over `paths`; reader
    "host" (decisions drawn on the host) or "native" (fn.readers.file, decisions in-graph)."""
    loader = MultiCropLoader(paths, batch_size=batch_size, backend="dali", device="cpu", num_workers=2,
                             shuffle=False, reader=reader, **cfg)
    impl = DaliMultiCrop(loader, return_params=True)
    return loader, list(impl.epoch(loader._indices(), 0))


@pytest.mark.parametrize("backend", ["torch", "dali", "dali-native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_crop_shape_dtype_range(tmp_path, backend, dtype):
    write_photos(tmp_path, 6, classes=2)
    backend, _, reader = backend.partition("-")
    loader = MultiCropLoader(tmp_path, batch_size=3, backend=backend, device="cpu", dtype=dtype,
                             num_workers=1, reader=reader or "host", **SMALL)
    assert loader.backend == backend and len(loader) == 2
    lo = (0 - torch.tensor(loader.config.mean)) / torch.tensor(loader.config.std)
    hi = (1 - torch.tensor(loader.config.mean)) / torch.tensor(loader.config.std)
    batches = list(loader)
    assert len(batches) == 2
    for crops, labels in batches:
        assert labels.dtype == torch.long and labels.shape == (3,) and set(labels.tolist()) <= {0, 1}
        assert [tuple(c.shape) for c in crops] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 2
        for c in crops:
            assert c.dtype == dtype and c.device.type == "cpu" and torch.isfinite(c).all()
            per_channel = c.float().transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= lo - 0.05).all() and (per_channel.max(1).values <= hi + 0.05).all()
            assert per_channel.std() > 0.1            # a photo, not a constant image


@pytest.mark.parametrize("jitter_order", ["random", "fixed"])
def test_dali_pixels_match_reference_ops_given_same_decisions(tmp_path, jitter_order):
    image = Image.fromarray(photo("astronaut")).resize((150, 110))
    image.save(tmp_path / "a.jpg", quality=95)
    decoded = Image.open(tmp_path / "a.jpg").convert("RGB")   # both sides start from the same pixels
    loader, batches = dali_batches([str(tmp_path / "a.jpg")] * 24, 8, jitter_order=jitter_order, **SMALL)
    positions = torch.cat([b[3] for b in batches])[..., P.HUE_POS]
    expected_positions = {0, 1, 2, 3, 4} if jitter_order == "random" else {1, 4}
    assert set(positions.int().unique().tolist()) == expected_positions
    errors, seen = [], {"flip": 0, "jitter": 0, "gray": 0, "blur": 0, "solarize": 0}
    for crops, _, _, params in batches:
        e, s = errors_against_reference(crops, params.numpy(), lambda b: decoded, loader.config)
        errors.append(e)
        seen = {key: seen[key] + s[key] for key in seen}
    errors = np.concatenate(errors)
    assert all(v > 0 for v in seen.values()), seen      # every op was exercised
    # 0-255 levels: resampling / blur kernels / rounding differ slightly; a wrong box, flip
    # or colour op gives tens of levels
    assert errors.mean() < 2.0 and errors.max() < 6.0, (errors.mean(), errors.max())


def _rates(crops_plain, crops_aug, cfg):
    """Per-crop detections of each op's effect against the same crop with every op off."""
    plain, aug = denorm(crops_plain, cfg), denorm(crops_aug, cfg)
    diff = (aug - plain).abs().mean(dim=(1, 2, 3))
    mirror = (aug - plain.flip(-1)).abs().mean(dim=(1, 2, 3))
    channel_spread = (aug.max(1).values - aug.min(1).values).amax(dim=(1, 2))
    lap = lambda x: (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1]   # noqa: E731
                     - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).abs().mean(dim=(1, 2, 3))
    return {"changed": diff > 2 / 255, "flip": mirror < diff, "gray": channel_spread < 2 / 255,
            "blurred": lap(aug) < 0.8 * lap(plain)}


OPS = {  # name: (config overriding ALL_OFF, detector, expected rate per crop index)
    "flip": (dict(flip_p=0.5), "flip", lambda k: 0.5),
    "jitter": (dict(jitter_p=0.8), "changed", lambda k: 0.8),
    "gray": (dict(grayscale_p=0.2), "gray", lambda k: 0.2),
    "blur": (dict(blur_p_global1=1.0, blur_p_global2=0.1, blur_p_local=0.5, blur_sigma=(1.0, 2.0)),
             "blurred", lambda k: [1.0, 0.1][k] if k < 2 else 0.5),
    "solarize": (dict(solarize_p=0.2), "changed", lambda k: 0.2 if k == 1 else 0.0),
}
N_DRAWS = 96
BACKENDS = ("torch", "dali", "dali-native")


@pytest.fixture(scope="module")
def square_photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("sq") / "coffee.png"
    Image.fromarray(photo("coffee")).resize((48, 48), Image.BICUBIC).save(path)
    return str(path)


def _run(backend, path, overrides):
    """ncrops tensors (N_DRAWS, 3, S, S): the same photo with the crop box fixed to the whole
    image (scale 1, ratio 1), only `overrides` switched on."""
    cfg = dict(SMALL, global_size=32, local_size=16, global_crops_scale=(1.0, 1.0),
               local_crops_scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**ALL_OFF, **overrides})
    if backend.startswith("dali"):
        loader, batches = dali_batches([path] * N_DRAWS, 32, reader=backend.partition("-")[2] or "host", **cfg)
        return [torch.cat([b[0][k] for b in batches]) for k in range(loader.config.ncrops)]
    aug = DataAugmentationDINO(config=AugmentConfig(**cfg))
    image = Image.open(path).convert("RGB")
    draws = [aug(image, generator=torch.Generator().manual_seed(i), rng=__import__("random").Random(i))
             for i in range(N_DRAWS)]
    return [torch.stack([d[k] for d in draws]) for k in range(len(draws[0]))]


@pytest.fixture(scope="module")
def plain_crops(square_photo):
    return {backend: _run(backend, square_photo, {}) for backend in BACKENDS}


@pytest.mark.parametrize("op", list(OPS))
def test_op_rates_from_pixels_match_probabilities(square_photo, plain_crops, op):
    overrides, detector, expected = OPS[op]
    cfg = AugmentConfig(**{**ALL_OFF, **overrides})
    rates = {}
    for backend in BACKENDS:
        aug = _run(backend, square_photo, overrides)
        rates[backend] = [float(_rates(p, a, cfg)[detector].float().mean())
                          for p, a in zip(plain_crops[backend], aug)]
    print(op, rates)
    if op == "solarize":    # never on global 1 or the locals: exactly zero
        assert all(r[k] == 0.0 for r in rates.values() for k in range(len(r)) if k != 1), rates
    for k in range(len(rates["torch"])):
        p = expected(k)
        tol = 4 * math.sqrt(max(p * (1 - p), 0.02) / N_DRAWS)   # ~4 sigma of a binomial rate
        for backend in BACKENDS:
            assert abs(rates[backend][k] - p) <= tol, (op, backend, k, rates)
            assert abs(rates["torch"][k] - rates[backend][k]) <= 1.5 * tol, (op, k, rates)


@pytest.mark.parametrize("reader", ["host", "native"])
def test_crop_areas_within_scale_and_alike(tmp_path, reader):
    image = Image.fromarray(photo("chelsea"))            # 451 x 300: not square
    image.save(tmp_path / "c.jpg")
    cfg = AugmentConfig(**SMALL)
    loader, batches = dali_batches([str(tmp_path / "c.jpg")] * 64, 32, reader=reader, **SMALL)
    params = torch.cat([b[3] for b in batches]).numpy()             # (64, ncrops, NPARAMS)
    area = ((params[..., P.Y1] - params[..., P.Y0]) * (params[..., P.X1] - params[..., P.X0])
            / (image.height * image.width))
    aug = DataAugmentationDINO(config=cfg)
    ref = np.array([[p.area_fraction for p in aug(image, generator=torch.Generator().manual_seed(i),
                                                   rng=__import__("random").Random(i), return_params=True)[1]]
                    for i in range(64)])
    for a in (area, ref):
        # rounding of w, h to whole pixels moves the area by at most ~1 % of the range limits
        assert (a[:, :2] >= 0.4 * 0.98).all() and (a[:, :2] <= 1.0).all()
        assert (a[:, 2:] >= 0.05 * 0.98).all() and (a[:, 2:] <= 0.4 * 1.02).all()
    assert abs(area[:, :2].mean() - ref[:, :2].mean()) < 0.06     # uniform(0.4, 1): mean 0.7, sd 0.17
    assert abs(area[:, 2:].mean() - ref[:, 2:].mean()) < 0.03     # uniform(0.05, 0.4): mean 0.225


def test_crop_box_fallback_is_the_reference_central_crop():
    """A 20 x 600 strip: no attempt fits, both samplers fall back to the same central crop."""
    from dino_fast.pipelines.reference import resized_crop_params
    cfg = AugmentConfig()
    boxes = P.crop_boxes(np.random.default_rng(0), 20, 600, np.asarray(cfg.crop_scales()), cfg.ratio)
    expected = resized_crop_params(20, 600, cfg.global_crops_scale, cfg.ratio, torch.Generator().manual_seed(0))
    assert tuple(boxes[0]) == tuple(boxes[1]) == expected == (0, 286, 20, 27)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_matches_cpu_pipeline(tmp_path):
    """Same host-drawn decisions: nvJPEG + GPU ops vs the CPU pipeline, pixel for pixel
    up to decoder / resampling rounding."""
    paths = write_photos(tmp_path, 8, size=160)
    out = {}
    for device in ("cpu", "cuda"):
        loader = MultiCropLoader(paths, batch_size=4, backend="dali", device=device, seed=3,
                                 dtype=torch.float32, num_workers=2, **SMALL)
        out[device] = [(c, lab) for c, lab in loader]
        assert all(x.device.type == device for c, _ in out[device] for x in c)
    for (cc, lc), (gc, lg) in zip(out["cpu"], out["cuda"]):
        assert lc.tolist() == lg.cpu().tolist()
        for x, y in zip(cc, gc):
            err = (denorm(x, AugmentConfig()) - denorm(y.cpu(), AugmentConfig())).abs() * 255
            assert err.mean() < 2.0 and err.amax(dim=(1, 2, 3)).max() < 64, float(err.mean())


def test_jitter_order_distribution_is_the_reference_permutation():
    """Where hue falls among contrast and saturation, from the reference's uniform
    permutation of 4 ops (torch.randperm draws) vs the host sampler's HUE_POS."""
    g = torch.Generator().manual_seed(0)
    ref = np.zeros(4)
    for _ in range(6000):
        order = [k for k in torch.randperm(4, generator=g).tolist() if k != 0]   # drop brightness
        h, c, s = order.index(3), order.index(1), order.index(2)
        ref[0 if h < min(c, s) else 3 if h > max(c, s) else 1 if c < s else 2] += 1
    cfg = AugmentConfig(jitter_p=1.0)
    rng = np.random.default_rng(0)
    pos = np.concatenate([P.draw_params(rng, 100, 100, cfg)[:, P.HUE_POS] for _ in range(600)])
    ours = np.bincount(pos.astype(int), minlength=4)[:4]
    np.testing.assert_allclose(ours / ours.sum(), ref / ref.sum(), atol=0.03)
    np.testing.assert_allclose(ref / ref.sum(), P.HUE_POS_P, atol=0.03)
