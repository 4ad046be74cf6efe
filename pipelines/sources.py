"""Where images come from: folders, file lists, webdataset tar shards, arrays.

`open_source(spec)` turns what the user passed into a `Source`:
- a directory with class subfolders  -> ImageFolder (labels = sorted class index)
- a directory of images              -> flat folder (label -1)
- a directory of .tar files, a glob (`shards/train-*.tar`) or a list of .tar
  paths                              -> webdataset shards (key.jpg|png + key.cls)
- a .txt file, one `path [label]` per line (relative to the list's folder)
- an `ArraySource(images, labels)`   -> in-memory uint8 (N,H,W) or (N,H,W,3)
Missing or empty sources raise at once with the path and the fix.

Every source is indexable: `name(i)`, `labels[i]`, `read(i)` -> encoded bytes
(ArraySource: `read_array(i)` -> (H, W, 3) uint8). Sources are picklable (tar
handles open lazily per process) so DataLoader workers can use them.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, is_image_file

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png")


class SourceError(ValueError):
    """The data source is missing, empty or malformed; the message says what to do."""


class BatchSizeError(SourceError):
    """Fewer images per process than one batch (with drop_last): not a single step per epoch."""

    def __init__(self, message: str, *, images: int, per_rank: int, batch_size: int, world_size: int):
        super().__init__(message)
        self.images, self.per_rank, self.batch_size, self.world_size = images, per_rank, batch_size, world_size


class Source:
    """Base: `names` (display names), `labels` (int64 array, -1 = unlabelled)."""
    encoded = True
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return self.names[i]

    def read(self, i: int) -> bytes:
        raise NotImplementedError


class FileSource(Source):
    """Image files on disk (ImageFolder, flat folder or file list)."""

    def __init__(self, paths: list[str], labels, classes: list[str] | None = None, kind: str = "files"):
        self.names = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.kind = kind

    def read(self, i: int) -> bytes:
        with open(self.names[i], "rb") as f:
            return f.read()

    def __repr__(self):
        return f"FileSource({self.kind}, {len(self)} images)"


class TarSource(Source):
    """webdataset shards: members `key.<jpg|jpeg|png>` (+ optional `key.cls`)."""

    def __init__(self, shards: list[str]):
        self.shards = list(shards)
        shard_idx, offsets, sizes, names, labels = [], [], [], [], []
        for s, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard, "r:") as tar:
                    members = tar.getmembers()
                    images, cls = {}, {}
                    for m in members:
                        if not m.isfile():
                            continue
                        key, _, ext = m.name.partition(".")
                        if ext.lower() in SHARD_IMAGE_EXTS:
                            images[key] = m
                        elif ext == "cls":
                            cls[key] = int(tar.extractfile(m).read().decode().strip() or -1)
            except (tarfile.TarError, OSError, ValueError) as err:
                raise SourceError(f"{shard}: not a readable webdataset tar shard ({err}); "
                                  "re-create it with `dino-fast pack`") from None
            for key, m in images.items():
                shard_idx.append(s)
                offsets.append(m.offset_data)
                sizes.append(m.size)
                names.append(f"{shard}:{m.name}")
                labels.append(cls.get(key, -1))
        if not names:
            raise SourceError(f"{self.shards[0] if len(self.shards) == 1 else str(len(self.shards)) + ' shards'}"
                              f": no images ({'/'.join(SHARD_IMAGE_EXTS)} members) in the tar shards; "
                              "pack a folder with `dino-fast pack SRC DST`")
        self.shard_idx = np.asarray(shard_idx, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.names = names
        self.labels = np.asarray(labels, dtype=np.int64)
        self._handles: dict = {}
        self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def read(self, i: int) -> bytes:
        if self._pid != os.getpid():          # fresh descriptors in each worker process
            self._handles, self._pid = {}, os.getpid()
        s = int(self.shard_idx[i])
        fd = self._handles.get(s)
        if fd is None:
            fd = self._handles.setdefault(s, os.open(self.shards[s], os.O_RDONLY))
        size = int(self.sizes[i])
        data = os.pread(fd, size, int(self.offsets[i]))   # positional: safe across reader threads
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes): shard truncated?")
        return data

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._handles.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __repr__(self):
        return f"TarSource({len(self.shards)} shards, {len(self)} images)"


class ArraySource(Source):
    """In-memory images: uint8 (N, H, W) grayscale or (N, H, W, 3) RGB, labels optional."""
    encoded = False

    def __init__(self, images, labels=None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise SourceError(f"ArraySource: images must be uint8 (N,H,W) or (N,H,W,3), got "
                              f"{images.dtype} {images.shape}; convert with .astype(np.uint8)")
        if len(images) == 0:
            raise SourceError("ArraySource: no images (N = 0)")
        self.images = images
        self.labels = (np.full(len(images), -1, dtype=np.int64) if labels is None
                       else np.asarray(labels, dtype=np.int64))
        if self.labels.shape != (len(images),):
            raise SourceError(f"ArraySource: {len(images)} images but labels of shape {self.labels.shape}")

    def name(self, i: int) -> str:
        return f"array[{i}]"

    def read_array(self, i: int) -> np.ndarray:
        img = self.images[i]
        return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img   # (H, W, 3)

    def __repr__(self):
        return f"ArraySource({len(self)} images {self.images.shape[1:]})"


def _list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and is_image_file(p.name))


def _image_folder(root: Path) -> Source:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes, paths, labels = [], [], []
    for d in subdirs:
        files = [str(p) for p in sorted(d.rglob("*")) if p.is_file() and is_image_file(p.name)]
        if files:
            labels += [len(classes)] * len(files)
            classes.append(d.name)
            paths += files
    if paths:
        return FileSource(paths, labels, classes, kind="imagefolder")
    flat = _list_images(root)
    if flat:
        return FileSource(flat, [-1] * len(flat), None, kind="flat")
    raise SourceError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files in the "
                      "folder and in its class subfolders); point to a folder of images, an ImageFolder "
                      "tree, a .txt file list or webdataset .tar shards")


def _file_list(path: Path) -> Source:
    paths, labels = [], []
    base = path.parent
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = -1
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
        p = Path(line) if os.path.isabs(line) else base / line
        paths.append(str(p))
        labels.append(label)
    if not paths:
        raise SourceError(f"{path}: the file list is empty; write one image path per line "
                          "(optionally followed by an integer label)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SourceError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]} "
                          f"(relative paths are taken from {base}); fix the list")
    return FileSource(paths, labels, None, kind="filelist")


def open_source(spec) -> Source:
    """Resolve a user's source (path, glob, list of shards, Source) into a `Source`."""
    try:
        return _open_source(spec)
    except (PermissionError, NotADirectoryError, UnicodeDecodeError) as err:   # unreadable lists / folders
        where = getattr(err, "filename", None) or spec
        why = getattr(err, "strerror", None) or f"not a text file ({err.reason})"
        raise SourceError(f"{where}: cannot read it ({why}); check its permissions, or pass an image "
                          "folder, a .txt file list or .tar shards") from None


def _open_source(spec) -> Source:
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, (list, tuple)):
        paths = [str(p) for p in spec]
        if not paths:
            raise SourceError("empty list of sources; pass a folder, a .txt list or .tar shards")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise SourceError(f"{missing[0]}: no such file ({len(missing)} of {len(paths)} missing)")
        if all(p.endswith(".tar") for p in paths):
            return TarSource(paths)
        return FileSource(paths, [-1] * len(paths), None, kind="filelist")
    spec = str(spec)
    if any(c in spec for c in "*?["):
        shards = sorted(glob.glob(spec))
        if not shards:
            raise SourceError(f"{spec}: the pattern matches no files; check the path or pack shards "
                              "with `dino-fast pack SRC DST`")
        if not all(s.endswith(".tar") for s in shards):
            raise SourceError(f"{spec}: a glob must name .tar shards (matched e.g. {shards[0]})")
        return TarSource(shards)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory; pass an image folder, an ImageFolder "
                          "tree, a .txt file list or webdataset .tar shards")
    if path.is_file():
        if path.suffix == ".tar":
            return TarSource([str(path)])
        if path.suffix == ".txt":
            return _file_list(path)
        raise SourceError(f"{path}: unsupported source file (expected a .txt list or a .tar shard)")
    shards = sorted(str(p) for p in path.glob("*.tar"))
    if shards:
        source = TarSource(shards)
        for meta in sorted(path.glob("*.json")):      # written by `dino-fast pack`
            try:
                source.classes = json.loads(meta.read_text()).get("classes")
            except (ValueError, AttributeError):
                pass
        return source
    return _image_folder(path)
