"""Atomic file writes with the user's file mode, for everything dino-fast writes.

`atomic_write(path, write)` calls `write(tmp)` for a temporary file next to
`path` and renames it over `path` (os.replace), so a reader never sees a
partial file and an interrupted write leaves the old file. The temporary file
is created like `open(path, "w")` would create it: mode 0666 less the umask
(0644 with the usual umask 022), not tempfile.mkstemp's 0600, so exports,
bench results and caches are as readable for colleagues on a shared machine
as checkpoints are. No torch import here (the bench and kernel tools use it).
"""
from __future__ import annotations

import json
import os
import secrets
from typing import Callable


def _create_temp(path: str) -> str:
    """A new empty file `.<name>.<pid>.<random>.tmp<ext>` next to path (mode 0666 & ~umask)."""
    folder, name = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(name)[1]     # keep the extension: some writers go by it (PNG)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{folder}: could not create a temporary file for {name}")


def atomic_write(path, write: Callable[[str], None]) -> str:
    """write(tmp) into a temporary file next to `path`, then rename it over `path`; the
    temporary file is removed if write fails. Returns `path`."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(text: str, path) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def atomic_write_json(obj, path, indent: int = 1, sort_keys: bool = True) -> str:
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys), path)
