"""Evaluation data: ImageFolder datasets with the reference's plain eval
transform (Resize 256 bicubic, CenterCrop 224, ImageNet normalisation; no
augmentation), clear errors for missing/empty folders and unreadable images."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def eval_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """The reference eval_knn.py / eval_linear.py validation transform."""
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB: grayscale, CMYK, palette and 16-bit images
    are converted (16-bit scaled to 8 bits, not clipped); unreadable or
    truncated files raise an error naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises many types (OSError, UnidentifiedImageError, ...)
        raise RuntimeError(f"{path}: cannot read the image ({type(e).__name__}: {e}); "
                           "replace or remove the file") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def image_folder(root: str, transform=None, *, what: str = "--data_path") -> datasets.ImageFolder:
    """torchvision ImageFolder (one subfolder per class) with errors that name
    the folder and the fix."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root}: no such folder ({what}). Expected an ImageFolder: one subfolder per class "
            "holding its images, e.g. train/cat/1.jpg")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class subfolders ({what}). Put the images of each class in "
                         "its own subfolder, e.g. train/cat/1.jpg, train/dog/2.jpg")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=load_rgb)
    except FileNotFoundError as e:
        raise ValueError(f"{root}: a class subfolder holds no image ({e}). Supported extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)}; remove empty class folders") from e


def train_val_folders(data_path: str, transform=None) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """`data_path/train` and `data_path/val` as ImageFolders with the same classes."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"{data_path}: no such folder (--data_path). It must contain train/ and "
                                "val/ ImageFolders (one subfolder per class)")
    train = image_folder(os.path.join(data_path, "train"), transform, what="--data_path/train")
    val = image_folder(os.path.join(data_path, "val"), transform, what="--data_path/val")
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise ValueError(f"{data_path}: train/ and val/ have different class folders (e.g. {missing}); "
                         "both must hold the same class names")
    return train, val


def eval_datasets(data_path: str, resize: int | None = None, crop: int | None = None):
    """(train, val) datasets of the k-NN / linear commands. A folder: its train/ and
    val/ ImageFolders under the reference eval transform (Resize `resize`, default 256,
    CenterCrop `crop`, default 224). "demo": the demo's images with the demo k-NN's
    split and input (`crop` px, default the demo preset's global crop size)."""
    if data_path == "demo":
        from dino_fast.train.demo import DemoImages
        from dino_fast.train.presets import PRESETS
        if resize is not None:
            raise ValueError("--resize does not apply to --data_path demo (the demo images are fed at --crop px)")
        size = crop or PRESETS["demo"]["global_size"]
        return DemoImages("train", size), DemoImages("val", size)
    return train_val_folders(data_path, eval_transform(resize or 256, crop or 224))


def eval_loader(dataset, batch_size: int = 128, num_workers: int = 8,
                device: torch.device | str = "cpu") -> torch.utils.data.DataLoader:
    """In-order loader (no shuffle, no dropped tail) for feature extraction."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=False)


def dataset_labels(dataset) -> torch.Tensor:
    """int64 labels of an ImageFolder (or any dataset with `targets`)."""
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets, dtype=torch.int64)
    return torch.as_tensor([y for _, y in dataset], dtype=torch.int64)


def dataset_digest(dataset) -> str:
    """sha256 identifying an ImageFolder's content for the feature cache: its
    root, every sample (relative path, label) and the mtime of every class
    folder (changes when files are added, removed or renamed). Files
    rewritten in place under the same name are not detected: clear the cache
    (--cache_dir none) after editing images."""
    import hashlib
    root = os.path.abspath(getattr(dataset, "root", ""))
    h = hashlib.sha256(root.encode())
    for path, label in getattr(dataset, "samples", []):
        h.update(f"{os.path.relpath(path, root)}\0{label}\n".encode())
    for cls in getattr(dataset, "classes", []):
        try:
            h.update(f"{cls}:{os.stat(os.path.join(root, cls)).st_mtime_ns}".encode())
        except OSError:
            pass
    return h.hexdigest()
