"""DAVIS-2017 on disk (the official layout) and its indexed PNG masks.

    <root>/ImageSets/2017/val.txt               one sequence name per line
    <root>/JPEGImages/480p/<sequence>/00000.jpg ...
    <root>/Annotations/480p/<sequence>/00000.png ...  indexed PNG: 0 background,
                                                      1..n objects, 255 void
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dino_fast.eval.io import atomic_write

VOID = 255


def davis_palette(n: int = 256) -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map (n, 3) uint8 (the toolkit's
    _pascal_color_map): the bits of the index spread over R, G, B from the
    most significant bit down."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


@dataclass
class Sequence:
    name: str
    frames: list[str]        # JPEG paths, sorted
    annotations: str         # the annotation folder of this sequence

    def annotation(self, frame: str) -> str:
        return os.path.join(self.annotations, os.path.splitext(os.path.basename(frame))[0] + ".png")


def load_davis(root: str, split: str = "val", resolution: str = "480p", year: str = "2017",
               sequences: list[str] | None = None) -> list[Sequence]:
    """The sequences of ImageSets/<year>/<split>.txt (or `sequences`), with
    errors that name the missing file or folder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder (--data_path). Expected DAVIS-2017: JPEGImages/{resolution}/, "
                                f"Annotations/{resolution}/ and ImageSets/{year}/{split}.txt")
    names = sequences
    if not names:
        listing = os.path.join(root, "ImageSets", year, f"{split}.txt")
        if not os.path.isfile(listing):
            raise FileNotFoundError(f"{listing}: missing; DAVIS lists the sequences of each split in "
                                    f"ImageSets/{year}/{split}.txt (or pass --sequences)")
        with open(listing, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise ValueError(f"{listing}: lists no sequence")
    out = []
    for name in names:
        img_dir = os.path.join(root, "JPEGImages", resolution, name)
        ann_dir = os.path.join(root, "Annotations", resolution, name)
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"{img_dir}: missing; the frames of sequence {name!r} go in "
                                    f"JPEGImages/{resolution}/{name}/00000.jpg ...")
        frames = sorted(glob.glob(os.path.join(img_dir, "*.jpg")))
        if len(frames) < 2:
            raise ValueError(f"{img_dir}: {len(frames)} .jpg frames; a sequence needs at least 2")
        seq = Sequence(name, frames, ann_dir)
        first = seq.annotation(frames[0])
        if not os.path.isfile(first):
            raise FileNotFoundError(f"{first}: missing; semi-supervised segmentation starts from the first "
                                    f"frame's mask in Annotations/{resolution}/{name}/")
        out.append(seq)
    return out


def read_mask(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(indexed mask (H, W) uint8, its palette (256, 3) or None)."""
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises many types
        raise ValueError(f"{path}: cannot read the mask ({type(e).__name__}: {e})") from e
    palette = None
    if img.mode == "P":
        pal = img.getpalette()
        if pal:
            pal = np.asarray(pal, dtype=np.uint8)
            palette = np.zeros((256, 3), dtype=np.uint8)
            palette.reshape(-1)[:len(pal)] = pal[:768]
    elif img.mode not in ("L", "I", "1"):
        raise ValueError(f"{path}: a {img.mode} image; DAVIS masks are indexed (P) or grayscale PNGs of object ids")
    return np.asarray(img).astype(np.uint8), palette


def write_indexed_png(path: str, mask: np.ndarray, palette: np.ndarray) -> str:
    """Save an (H, W) uint8 label map as an indexed PNG with `palette` (atomic)."""
    if mask.ndim != 2:
        raise ValueError(f"indexed PNGs need a 2-D label map, got shape {mask.shape}")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_sequence_masks(folder: str, names: list[str]) -> np.ndarray:
    """(T, H, W) uint8 label maps of folder/<name>.png; errors name the missing file."""
    masks = []
    for n in names:
        p = os.path.join(folder, n + ".png")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing; each frame needs an indexed PNG named after its JPEG")
        m, _ = read_mask(p)
        if masks and m.shape != masks[0].shape:
            raise ValueError(f"{p}: {m.shape} mask where the sequence's masks are {masks[0].shape}")
        masks.append(m)
    return np.stack(masks)
