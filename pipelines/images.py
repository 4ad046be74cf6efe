"""Decoding one image robustly, the way the reference's PIL path would.

`decode_rgb(data, name)` -> 8-bit RGB PIL image: CMYK, grayscale, palette and
alpha images are converted with PIL (the reference's `.convert("RGB")`);
16-bit images are scaled to 8 bits (PIL's plain convert would clip them to
white); truncated or corrupt files raise `BadImageError` naming the file.
Images smaller than a crop need nothing here: the resized crop upsamples them.

`inspect_encoded(data, name)` is the cheap check the DALI path runs before
handing bytes to the GPU decoder: header only (PIL lazy open) plus the end
marker of JPEG / PNG, so truncated files never reach nvJPEG.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".jfif")


class BadImageError(ValueError):
    """An image that cannot be decoded into valid pixels; the message names the file."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")   # CMYK, L, LA, P, RGBA, YCbCr, 1: what the reference does


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Encoded bytes -> fully loaded 8-bit RGB PIL image, or BadImageError."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise BadImageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process: "
                            "truncated images would decode to grey garbage; set it back to False")
    if len(data) == 0:
        raise BadImageError(f"{name}: empty file (0 bytes); remove it or re-download it")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        rgb = _to_rgb8(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: cannot decode image ({err}); remove or replace the file") from None
    if rgb.width < 1 or rgb.height < 1:
        raise BadImageError(f"{name}: image has no pixels ({rgb.width}x{rgb.height})")
    return rgb


@dataclass(frozen=True)
class EncodedInfo:
    format: str        # "JPEG", "PNG", ...
    mode: str          # PIL mode
    height: int
    width: int
    bits: int = 8      # bits per channel (PNG header; 8 for the rest)

    @property
    def gpu_decodable(self) -> bool:
        """True where DALI's decoder handles the bytes as the PIL path would:
        8-bit RGB / grayscale JPEG or PNG. Everything else is transcoded."""
        return (self.format == "JPEG" and self.mode in ("RGB", "L")) or (
            self.format == "PNG" and self.mode in ("RGB", "L") and self.bits == 8)


def inspect_encoded(data: bytes, name: str) -> EncodedInfo:
    """Header + end-marker check without decoding pixels, or BadImageError."""
    if len(data) == 0:
        raise BadImageError(f"{name}: empty file (0 bytes); remove it or re-download it")
    try:
        img = Image.open(io.BytesIO(data))
        bits = data[24] if img.format == "PNG" and len(data) > 24 else 8   # IHDR bit depth
        info = EncodedInfo(img.format or "?", img.mode, img.height, img.width, bits)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: not a readable image ({err}); remove or replace the file") from None
    if info.format == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        raise BadImageError(f"{name}: truncated JPEG (no end-of-image marker); re-download or remove it")
    if info.format == "PNG" and b"IEND" not in data[-64:]:
        raise BadImageError(f"{name}: truncated PNG (no IEND chunk); re-download or remove it")
    if info.width < 1 or info.height < 1:
        raise BadImageError(f"{name}: image has no pixels ({info.width}x{info.height})")
    return info


def verify_decodes(data: bytes, name: str) -> None:
    """Decode every byte of the entropy-coded data once, or BadImageError. JPEGs decode
    at 1/8 scale (PIL draft mode: the Huffman data is still read in full, the IDCT is
    cheap), about 2x faster than a full decode; JPEG decoders that only warn on garbled
    data (libjpeg-turbo in DALI's CPU path, nvJPEG) are guarded by this check."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: cannot decode image ({err}); remove or replace the file") from None
