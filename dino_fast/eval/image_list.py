"""A dataset over an explicit list of image files (the retrieval, copy
detection and PCA protocols name their images; they are not ImageFolders),
with optional per-image crop boxes and the reference transforms."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from dino_fast.eval.data import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_rgb


def normalize_transform() -> T.Compose:
    """ToTensor + ImageNet normalisation (no resize)."""
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Thumbnail:
    """PIL `thumbnail`: shrink so the longer side is at most `size`, keeping
    the aspect ratio (Lanczos), as the reference eval_image_retrieval.py."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        img = img.copy()
        img.thumbnail((self.size, self.size), Image.LANCZOS)
        return img

    def __repr__(self) -> str:
        return f"Thumbnail({self.size})"


class ImageListDataset(torch.utils.data.Dataset):
    """(image tensor, index) for each path; boxes[i] = (x1, y1, x2, y2)
    crops image i before the transform (revisited queries)."""

    def __init__(self, paths: Sequence[str], transform: Callable | None = None,
                 boxes: Sequence[Sequence[float] | None] | None = None):
        self.samples = list(paths)
        self.transform = transform
        self.boxes = list(boxes) if boxes is not None else None
        if self.boxes is not None and len(self.boxes) != len(self.samples):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.samples)} images")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = load_rgb(self.samples[i])
        if self.boxes is not None and self.boxes[i] is not None:
            img = img.crop(tuple(float(v) for v in self.boxes[i]))
        return (self.transform(img) if self.transform is not None else img), i


def list_image_files(folder: str, what: str, *, recursive: bool = False) -> list[str]:
    """Sorted image files of a folder; errors name the folder and the flag."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder ({what})")
    if recursive:
        files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    else:
        files = [os.path.join(folder, f) for f in os.listdir(folder)]
    files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(f))
    if not files:
        raise ValueError(f"{folder}: no images in this folder ({what}; extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_loader(dataset, batch_size: int, num_workers: int, device) -> torch.utils.data.DataLoader:
    """In-order loader; workers capped at the dataset size (no idle processes)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=min(num_workers, len(dataset)),
                                       pin_memory=torch.device(device).type == "cuda")
