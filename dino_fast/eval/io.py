"""Atomic file writes (dino_fast.io, plus torch.save) and file hashing for the evaluation tools."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from dino_fast.io import atomic_write, atomic_write_json  # noqa: F401  (the evaluation tools' writers)


def atomic_torch_save(obj, path: str) -> str:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
