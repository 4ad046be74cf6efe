"""Sources (ImageFolder, flat, file list, shards, arrays), bad input, sharding.

Real photographs from scikit-image are written as JPEG/PNG into tmp_path.
`write_photos` is shared with the other tests/test_pipeline*.py files and the
bench.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from dino_fast.pipelines import ArraySource, MultiCropLoader, SourceError, decode_rgb, open_source

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")
SMALL = dict(global_size=64, local_size=32, local_crops_number=2)


def photo(name: str) -> np.ndarray:
    img = getattr(skimage.data, name)()
    return img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)


def write_photos(root, n: int, classes: int = 0, ext: str = "jpg", size: int | None = 160) -> list[str]:
    """n real photographs (cycled, each a different crop/flip so images differ)
    as root/<class_k>/img_i.ext (classes > 0) or root/img_i.ext."""
    paths = []
    for i in range(n):
        img = photo(PHOTOS[i % len(PHOTOS)])
        k = i // len(PHOTOS)
        img = img[k * 7:, k * 5:]          # a different view per cycle
        if k % 2:
            img = img[:, ::-1]
        pil = Image.fromarray(np.ascontiguousarray(img))
        if size:
            pil.thumbnail((size, size))
        folder = os.path.join(str(root), f"class_{i % classes}") if classes else str(root)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img_{i:04d}.{ext}")
        pil.save(path, quality=90) if ext == "jpg" else pil.save(path)
        paths.append(path)
    return paths


def all_ids(loader) -> list[int]:
    """Identify images by label in a loader whose labels are unique per image."""
    return [int(x) for _, labels in loader for x in labels]


# ---------------------------------------------------------------- sources
def test_imagefolder_labels_are_sorted_class_index(tmp_path):
    for cls in ("zebra", "apple"):
        write_photos(tmp_path / cls, 2)
    src = open_source(tmp_path)
    assert src.classes == ["apple", "zebra"]
    assert sorted(src.labels.tolist()) == [0, 0, 1, 1]
    assert all(("apple" in n) == (lab == 0) for n, lab in zip(src.names, src.labels))


def test_flat_folder_is_unlabelled(tmp_path):
    write_photos(tmp_path, 4)
    loader = MultiCropLoader(tmp_path, batch_size=2, backend="torch", num_workers=0, **SMALL)
    labels = torch.cat([lab for _, lab in loader])
    assert labels.dtype == torch.long and labels.tolist() == [-1] * 4


def test_file_list_with_and_without_labels(tmp_path):
    paths = write_photos(tmp_path / "imgs", 3)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nimgs/{os.path.basename(paths[0])} 7\n{paths[1]}\n\nimgs/{os.path.basename(paths[2])} 2\n")
    src = open_source(lst)
    assert src.labels.tolist() == [7, -1, 2]
    assert decode_rgb(src.read(1), src.name(1)).size == Image.open(paths[1]).size


def test_array_source_grayscale_to_three_channels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    loader = MultiCropLoader(ArraySource(images, np.arange(6)), batch_size=3, backend="torch",
                             num_workers=0, shuffle=False, **SMALL)
    crops, labels = next(iter(loader))
    assert labels.tolist() == [0, 1, 2]
    assert [tuple(c.shape) for c in crops] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 2
    # a gray source stays gray: channels equal after undoing the per-channel normalisation
    mean, std = torch.tensor(loader.config.mean)[:, None, None], torch.tensor(loader.config.std)[:, None, None]
    rgb = crops[2] * std + mean
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)


@pytest.mark.parametrize("bad", ["missing", "empty_dir", "empty_list", "no_match_glob", "uint16_array"])
def test_missing_or_empty_source_fails_at_once_naming_it(tmp_path, bad):
    if bad == "missing":
        spec, needle = tmp_path / "nope", "nope"
    elif bad == "empty_dir":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.md").write_text("x")
        spec, needle = tmp_path / "empty", "empty"
    elif bad == "empty_list":
        (tmp_path / "l.txt").write_text("\n# nothing\n")
        spec, needle = tmp_path / "l.txt", "l.txt"
    elif bad == "no_match_glob":
        spec, needle = str(tmp_path / "shards-*.tar"), "shards-*.tar"
    else:
        with pytest.raises(SourceError, match="uint8"):
            ArraySource(np.zeros((2, 8, 8), np.uint16))
        return
    with pytest.raises(SourceError, match=needle.replace("*", r"\*")):
        MultiCropLoader(spec, batch_size=1, backend="torch", **SMALL)


def test_auto_backend_is_torch_on_cpu_and_logged(tmp_path, caplog, monkeypatch):
    import logging

    from dino_fast.pipelines import loader as loader_mod
    write_photos(tmp_path, 2)
    with caplog.at_level(logging.INFO, logger="dino_fast.pipelines.loader"):
        loader = MultiCropLoader(tmp_path, batch_size=1, backend="auto", device="cpu", **SMALL)
    assert loader.backend == "torch" and "backend=torch (requested auto)" in caplog.text
    assert loader_mod.choose_backend("auto", torch.device("cuda")) == (
        "dali" if loader_mod.dali_available() else "torch")
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    assert loader_mod.choose_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        loader_mod.choose_backend("dali", torch.device("cuda"))
    with pytest.raises(ValueError, match="backend='tf'"):
        MultiCropLoader(tmp_path, batch_size=1, backend="tf", **SMALL)
