"""Atomic file writes and file hashing for the evaluation tools."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable

import torch


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call write(tmp_path) for a temp file next to `path`, then rename it
    over `path` (readers never see a partial file). Returns `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # keep the extension: some writers use it (PNG)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj, path: str) -> str:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj, path: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    return atomic_write(path, write)


def file_sha256(path: str, block: int = 1 << 24) -> str:
    """sha256 of a file, or of every file under a folder (a sharded
    torch.distributed.checkpoint), names included."""
    h = hashlib.sha256()
    paths = [path]
    if os.path.isdir(path):
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, path).encode() if p != path else b"")
        with open(p, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()


def cached_file_sha256(path: str, cache_dir: str) -> str:
    """file_sha256 remembered per (absolute path, size, mtime) in
    cache_dir/hashes.json, so a second run does not re-read a large checkpoint."""
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    stats = [os.stat(p) for p in files]
    key = f"{os.path.abspath(path)}|{sum(s.st_size for s in stats)}|{max((s.st_mtime_ns for s in stats), default=0)}"
    index_path = os.path.join(cache_dir, "hashes.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = file_sha256(path)
        atomic_write_json(index, index_path)
    return index[key]
