"""Files dino-fast writes get the user's umask (0644 with umask 022), as open() would give them,
not tempfile.mkstemp's 0600: exports, bench results, caches, JSON results, shards."""
from __future__ import annotations

import os
import re
import stat

import pytest
import torch

from dino_fast.io import atomic_write, atomic_write_json, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    from dino_fast.benchmark.baseline import write_json_atomic
    from dino_fast.commands.kernels import _write_atomic
    from dino_fast.eval.io import atomic_torch_save
    want = 0o666 & ~umask                                   # what open(path, "w") creates
    paths = [atomic_write_json({"a": 1}, tmp_path / "r.json"),
             atomic_write_text("x", tmp_path / "t.md"),
             atomic_torch_save({"w": torch.zeros(2)}, str(tmp_path / "export.pth")),
             atomic_write(tmp_path / "sub" / "p.bin", lambda tmp: open(tmp, "wb").write(b"\0"))]
    write_json_atomic(str(tmp_path / "bench" / "cpu.json"), {"rows": []})
    _write_atomic(str(tmp_path / "kernels_sm90.json"), "{}")
    paths += [tmp_path / "bench" / "cpu.json", tmp_path / "kernels_sm90.json"]
    with open(tmp_path / "plain.txt", "w") as f:            # the reference: a plain open()
        f.write("x")
    assert _mode(tmp_path / "plain.txt") == want
    assert {str(p): oct(_mode(p)) for p in paths} == {str(p): oct(want) for p in paths}
    assert sorted(os.listdir(tmp_path / "sub")) == ["p.bin"]          # no temporary file left


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    atomic_write_text("old", tmp_path / "f.txt")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "f.txt", fail)
    assert os.listdir(tmp_path) == ["f.txt"] and (tmp_path / "f.txt").read_text() == "old"


def test_packed_shards_and_their_json_follow_the_umask(tmp_path, umask):
    from dino_fast.commands.pack import pack
    from tests.test_pipeline_sources import write_photos
    write_photos(tmp_path / "src", 2, size=32)
    pack(tmp_path / "src", str(tmp_path / "dst"), progress=False)
    modes = {f: _mode(tmp_path / "dst" / f) for f in os.listdir(tmp_path / "dst")}
    assert modes == {"shard-000000.tar": 0o666 & ~umask, "shard.json": 0o666 & ~umask}


def test_no_module_creates_files_with_mkstemp():
    """One writer for temporary files (dino_fast.io): mkstemp / NamedTemporaryFile create 0600."""
    found = []
    for top in ("dino_fast", "pipelines", "kernels", "tools"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(d, f), encoding="utf-8").read()
                    if re.search(r"mkstemp\(|NamedTemporaryFile\(", text):
                        found.append(os.path.relpath(os.path.join(d, f), ROOT))
    assert found == []
