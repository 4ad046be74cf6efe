"""The demo data (Fashion-MNIST images shipped in the package) and the demo's
k-NN check: weighted 20-NN (T = 0.07) top-1 of the teacher backbone's CLS
features, as the reference eval_knn.py, before and after training.

Data: `dino_fast/data/fashion_mnist_demo.npz`, 4,000 training images (400 per
class) and 1,000 test images (100 per class) from Zalando's Fashion-MNIST
(MIT licence; see fashion_mnist_demo.json and build_demo_data.py).
"""
from __future__ import annotations

import json
import logging
import os
import time
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

DATA_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                         "fashion_mnist_demo.npz")
log = logging.getLogger(__name__)
KNN_K, KNN_T = 20, 0.07
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@lru_cache(maxsize=1)
def load_demo_arrays() -> dict[str, np.ndarray]:
    """x_train (4000, 28, 28) uint8, y_train (4000,), x_test (1000, 28, 28), y_test (1000,)."""
    if not os.path.isfile(DATA_FILE):
        raise FileNotFoundError(f"{DATA_FILE} is missing from the installed package: reinstall dino-fast, "
                                "or rebuild it with `python -m dino_fast.data.build_demo_data`")
    with np.load(DATA_FILE) as z:
        return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def demo_source(max_images: int = 0):
    """The training images as a pipelines ArraySource (labels kept, unused by DINO)."""
    from dino_fast.pipelines import ArraySource
    d = load_demo_arrays()
    n = max_images or len(d["x_train"])
    return ArraySource(d["x_train"][:n], d["y_train"][:n])


def _to_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) gray -> normalised (N, 3, size, size) float, resized bicubic if needed."""
    x = torch.from_numpy(images).float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(_MEAN).view(1, 3, 1, 1), torch.tensor(_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def features(backbone: torch.nn.Module, images: np.ndarray, size: int, device, batch: int = 250) -> torch.Tensor:
    """L2-normalised CLS features (N, D) of `images` at `size` px, fp32."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch):
        x = _to_input(images[i:i + batch], size).to(device)
        out.append(F.normalize(backbone(x).float(), dim=1).cpu())
    backbone.train(was_training)
    return torch.cat(out)


def knn_top1(backbone: torch.nn.Module, size: int, device, max_train: int = 0, phase: str = "") -> float:
    """Weighted 20-NN top-1 (%) on the demo test images, memory bank = the training images.
    `phase` ("before training", ...) names the evaluation in the two log lines it writes."""
    from dino_fast.eval.knn import knn_classifier
    d = load_demo_arrays()
    n = max_train or len(d["x_train"])
    what = f"k-NN {phase}" if phase else "k-NN"
    log.info("%s: teacher CLS features of %d training + %d test demo images at %d px, weighted %d-NN ...",
             what, n, len(d["x_test"]), size, KNN_K)
    t0 = time.perf_counter()
    train_f = features(backbone, d["x_train"][:n], size, device)
    test_f = features(backbone, d["x_test"], size, device)
    top1, _ = knn_classifier(train_f, torch.from_numpy(d["y_train"][:n]), test_f, torch.from_numpy(d["y_test"]),
                             KNN_K, KNN_T, num_classes=10)
    log.info("%s: top-1 %.1f%% (%.1f s)", what, float(top1), time.perf_counter() - t0)
    return float(top1)


class DemoImages(torch.utils.data.Dataset):
    """The demo images as a labelled dataset for the eval commands (`--data_path demo`):
    split "train" is the 4,000 images the demo trains on (its k-NN's memory bank), "val"
    the 1,000 held-out images its k-NN classifies; each item is fed as `knn_top1` feeds
    it: (3, size, size) normalised float, label int."""

    def __init__(self, split: str, size: int):
        if split not in ("train", "val"):
            raise ValueError(f"DemoImages: split must be 'train' or 'val', got {split!r}")
        d = load_demo_arrays()
        self.images, labels = (d["x_train"], d["y_train"]) if split == "train" else (d["x_test"], d["y_test"])
        self.targets = [int(y) for y in labels]
        self.size = size
        self.root = f"{DATA_FILE}:{split}"           # names the data in the feature-cache key
        with open(os.path.splitext(DATA_FILE)[0] + ".json") as f:
            self.classes = list(json.load(f)["classes"])
        self.transform = f"demo gray->RGB, bicubic {size}px, ImageNet normalisation"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _to_input(self.images[i:i + 1], self.size)[0], self.targets[i]
