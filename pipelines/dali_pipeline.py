"""The DALI multi-crop graph: decode once, crop and augment N times.

Per image: external source (encoded bytes from the host reader, label,
(ncrops, NPARAMS) decisions from `dali_params`) -- or, with a native reader,
fn.readers.file / fn.readers.webdataset and the same decisions drawn in the
graph (fn.random_crop_generator, fn.random.*) -> decode ("mixed" = nvJPEG on
the GPU, "cpu" on the host; EXIF orientation ignored, like the reference's PIL
path) -> for every crop:
  resize of the crop box to S x S (cubic, antialiased)           # RandomResizedCrop
  x * b                                                           # brightness
  contrast (blend with mean luma), saturation (hsv), hue          # in the sample's order
  (HSV rotation, arithmetic), each in a conditional
  if gray: hsv(saturation=0)                                      # grayscale
  if sigma > 0: gaussian_blur(sigma)                              # only those samples
  x + solarize * (x >= 128) * (255 - 2x)                          # solarization (global 2)
  crop_mirror_normalize(mirror=flip, mean*255, std*255) -> CHW fp32/fp16
The reference draws a random order of the four jitter ops; brightness commutes
with the others and contrast with saturation (up to clamping), so the outcome
depends only on where hue falls: that position is drawn with the reference's
probabilities (dali_params.HUE_ORDERS) and applied with conditionals
(AugmentConfig.jitter_order="fixed": always contrast, hue, saturation, no
conditionals, faster).

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


def _contrast(x, c):
    """Blend with the mean luma of the crop (PIL ImageEnhance.Contrast)."""
    channel_mean = fn.reductions.mean(x, axes=[0, 1])                   # (3,)
    gray_mean = (channel_mean[0] * GRAY_WEIGHTS[0] + channel_mean[1] * GRAY_WEIGHTS[1]
                 + channel_mean[2] * GRAY_WEIGHTS[2])
    return dmath.clamp(x * c + gray_mean * (1.0 - c), 0.0, 255.0)


def _jitter_after_brightness(x, row, to_dev):
    """Contrast, saturation and hue in the per-sample order HUE_POS (dali_params): each
    conditional runs its op only on the samples whose order puts it there."""
    pos = row[P.HUE_POS]
    shift = to_dev(row[P.HUE] * (1.0 / 360.0))
    if pos == 0.0:                                                       # h, c, s
        x = _hue_shift(x, shift)
    else:
        x = x
    if pos == 2.0:                                                       # s, h, c
        x = fn.hsv(x, saturation=row[P.SATURATION], dtype=types.FLOAT)
        x = _hue_shift(x, shift)
    else:
        x = x
    x = _contrast(x, to_dev(row[P.CONTRAST]))
    if pos == 1.0:                                                       # c, h, s
        x = _hue_shift(x, shift)
    else:
        x = x
    if pos != 2.0:
        x = fn.hsv(x, saturation=row[P.SATURATION], dtype=types.FLOAT)  # blend with luma
    else:
        x = x
    if pos == 3.0:                                                       # c, s, h
        x = _hue_shift(x, shift)
    else:
        x = x
    return x


def _augment_crop(image, params, k: int, size: int, cfg: AugmentConfig, on_gpu: bool, half: bool):
    row = params[k]                                                   # (NPARAMS,) on the host
    roi_start = fn.stack(row[P.Y0], row[P.X0])
    roi_end = fn.stack(row[P.Y1], row[P.X1])
    crop = fn.resize(image, roi_start=roi_start, roi_end=roi_end, size=[size, size],
                     interp_type=types.INTERP_CUBIC, antialias=True)   # (S, S, 3) uint8
    x = fn.cast(crop, dtype=types.FLOAT)
    to_dev = (lambda v: v.gpu()) if on_gpu else (lambda v: v)
    x = dmath.clamp(x * to_dev(row[P.BRIGHTNESS]), 0.0, 255.0)
    if cfg.jitter_order == "random":                                     # decided at graph build
        x = _jitter_after_brightness(x, row, to_dev)
        if row[P.GRAY] > 0.5:
            x = fn.hsv(x, saturation=0.0, dtype=types.FLOAT)             # luma in all 3 channels
        else:
            x = x
    else:   # fixed order c, h, s: no conditionals; grayscale folded into the saturation op
        x = _contrast(x, to_dev(row[P.CONTRAST]))
        x = _hue_shift(x, to_dev(row[P.HUE] * (1.0 / 360.0)))
        x = fn.hsv(x, saturation=row[P.SATURATION] * (1.0 - row[P.GRAY]), dtype=types.FLOAT)
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


def _graph_decisions(encoded, cfg: AugmentConfig):
    """(ncrops, NPARAMS) decisions drawn inside the graph (native readers): the same row
    layout as `dali_params.draw_params`, from fn.random_crop_generator / fn.random.*."""
    def flt(x):
        return fn.cast(x, dtype=types.FLOAT)

    def coin(p):
        return flt(fn.random.coin_flip(probability=float(p)))

    def uniform(lo, hi):
        return fn.random.uniform(range=[float(lo), float(hi)])

    shape = fn.peek_image_shape(encoded)                                 # (H, W, C), header only
    rows = []
    for k, (scale, blur_p) in enumerate(zip(cfg.crop_scales(), cfg.blur_ps())):
        anchor, extent = fn.random_crop_generator(shape, random_area=list(scale),
                                                  random_aspect_ratio=list(cfg.ratio), num_attempts=10)
        anchor, extent = flt(anchor), flt(extent)                        # (y, x), (h, w)
        jitter = coin(cfg.jitter_p)
        factors = [1.0 + jitter * (uniform(max(0.0, 1 - r), 1 + r) - 1.0)
                   for r in (cfg.brightness, cfg.contrast, cfg.saturation)]
        hue = jitter * uniform(-cfg.hue, cfg.hue) * 360.0
        order = (flt(fn.random.choice(4, p=list(P.HUE_POS_P))) if cfg.jitter_order == "random"
                 else float(P.FIXED_POS))
        hue_pos = jitter * order + (1.0 - jitter) * float(P.NO_JITTER)
        sigma = coin(blur_p) * uniform(*cfg.blur_sigma)
        solarize = coin(cfg.solarize_p if k == 1 else 0.0)
        rows.append(fn.stack(anchor[0], anchor[1], anchor[0] + extent[0], anchor[1] + extent[1],
                             coin(cfg.flip_p), jitter, *factors, hue, coin(cfg.grayscale_p), sigma,
                             solarize, hue_pos))
    return fn.stack(*rows)                                               # (ncrops, NPARAMS)


def _native_reader(reader: str, files, labels, shards, shuffle: bool, rank: int, world_size: int):
    """fn.readers.file / fn.readers.webdataset -> (encoded, labels)."""
    common = dict(random_shuffle=shuffle, shard_id=rank, num_shards=world_size, name="Reader",
                  initial_fill=1024, pad_last_batch=False)
    if reader == "file":
        return fn.readers.file(files=list(files), labels=[int(x) for x in labels], **common)
    encoded, cls = fn.readers.webdataset(paths=list(shards), ext=["jpg;jpeg;png", "cls"],
                                         missing_component_behavior="empty", **common)
    return encoded, cls                                                  # cls: raw ASCII bytes


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(source, cfg: AugmentConfig, device: str, encoded: bool, half: bool = False,
                       reader: str = "host", files=(), labels=(), shards=(), shuffle: bool = True,
                       rank: int = 0, world_size: int = 1):
    """Outputs: crop_0 ... crop_{n-1}, labels, params.

    reader "host": `source` (HostReader) feeds bytes, labels and host-drawn decisions.
    reader "file" / "webdataset": DALI reads `files` / `shards` itself (sharded by rank,
    buffer-shuffled) and draws the decisions in the graph."""
    if reader == "host":
        data, labels, params = fn.external_source(source=source, num_outputs=3, batch=True,
                                                  batch_info=True,
                                                  dtype=[types.UINT8, types.INT64, types.FLOAT],
                                                  ndim=[1 if encoded else 3, 0, 2])
    else:
        data, labels = _native_reader(reader, files, labels, shards, shuffle, rank, world_size)
        params = _graph_decisions(data, cfg)
    on_gpu = device == "gpu"
    if encoded:
        image = fn.decoders.image(data, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)            # (H, W, 3) uint8
    else:
        image = data.gpu() if on_gpu else data
    crops = [_augment_crop(image, params, k, size, cfg, on_gpu, half)
             for k, size in enumerate(cfg.crop_sizes())]
    return (*crops, labels, params)
