"""Rebuild `fashion_mnist_demo.npz` (the demo run's images) from the Debian
package `dataset-fashion-mnist` (Zalando Research, MIT licence):

    apt-get install -y dataset-fashion-mnist
    python -m dino_fast.data.build_demo_data

A class-balanced, seeded subset: 400 images per class from the training set
(4,000) for training and the k-NN memory bank, 100 per class from the test
set (1,000) for the k-NN queries. Stored as uint8 (N, 28, 28), compressed.
"""
from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np

SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(idx))


def build(out_dir: str, per_class_train: int = 400, per_class_test: int = 100, seed: int = 0) -> str:
    if not os.path.isdir(SOURCE_DIR):
        raise FileNotFoundError(f"{SOURCE_DIR} not found: install it with "
                                "`apt-get install -y dataset-fashion-mnist`")
    rng = np.random.default_rng(seed)
    xtr = _read_idx(f"{SOURCE_DIR}/train-images-idx3-ubyte.gz")
    ytr = _read_idx(f"{SOURCE_DIR}/train-labels-idx1-ubyte.gz")
    xte = _read_idx(f"{SOURCE_DIR}/t10k-images-idx3-ubyte.gz")
    yte = _read_idx(f"{SOURCE_DIR}/t10k-labels-idx1-ubyte.gz")
    itr, ite = _balanced(ytr, per_class_train, rng), _balanced(yte, per_class_test, rng)
    path = os.path.join(out_dir, "fashion_mnist_demo.npz")
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, x_train=xtr[itr], y_train=ytr[itr].astype(np.int64),
                        x_test=xte[ite], y_test=yte[ite].astype(np.int64))
    os.replace(tmp, path)
    meta = {
        "name": "Fashion-MNIST demo subset",
        "source": "https://github.com/zalandoresearch/fashion-mnist (Debian package dataset-fashion-mnist)",
        "copyright": "2017, Zalando SE",
        "license": "MIT (Expat): Permission is hereby granted, free of charge, to any person obtaining a copy "
                   "of this software and associated documentation files, to deal in the Software without "
                   "restriction, subject to the following condition: the above copyright notice and this "
                   "permission notice shall be included in all copies or substantial portions of the Software. "
                   "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.",
        "classes": CLASSES,
        "train": {"from": "train-images-idx3-ubyte", "per_class": per_class_train, "count": int(len(itr))},
        "test": {"from": "t10k-images-idx3-ubyte", "per_class": per_class_test, "count": int(len(ite))},
        "format": "uint8 (N, 28, 28) grayscale, int64 labels; seed %d class-balanced subset" % seed,
    }
    with open(os.path.join(out_dir, "fashion_mnist_demo.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "fashion_mnist_demo.json.tmp"), os.path.join(out_dir, "fashion_mnist_demo.json"))
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))))
