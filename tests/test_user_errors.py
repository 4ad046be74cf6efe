"""Errors the user causes, at the command line: one line naming the file or flag and the fix,
exit status 2, no traceback (unless --debug), nothing half-written left behind (no config.json
before the data is checked, no shard-*.tar.tmp, no incomplete set of shards)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dino_fast import cli
from dino_fast.errors import UserError
from dino_fast.pipelines.sources import SourceError
from tests.test_pipeline_sources import write_photos


def _error_line(capsys, command: str) -> str:
    """The command's one error line; asserts no traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"dino-fast {command}:")]
    assert lines, err
    return lines[-1]


def _tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---------------------------------------------------------------- train: data errors before any file
def _train(tmp_path, data, *extra):
    out = tmp_path / "run"
    rc = cli.main(["train", "--data_path", str(data), "--output_dir", str(out), "--device", "cpu",
                   "--num_workers", "0", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64",
                   "--global_size", "32", "--local_size", "16", "--local_crops_number", "0", *extra])
    return rc, out


def test_train_empty_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out = _train(tmp_path, tmp_path / "empty")
    line = _error_line(capsys, "train")
    assert rc == 2
    assert str(tmp_path / "empty") in line and "no images found" in line
    assert not out.exists() or _tree(out) == []        # no config.json


def test_train_missing_folder_is_one_line(tmp_path, capsys):
    rc, out = _train(tmp_path, tmp_path / "nope")
    assert rc == 2 and "does not exist" in _error_line(capsys, "train")
    assert not out.exists()


def test_train_batch_larger_than_dataset_names_the_flag_and_size(tmp_path, capsys):
    write_photos(tmp_path / "five", 5, size=40)
    rc, out = _train(tmp_path, tmp_path / "five", "--batch_size_per_gpu", "8")
    line = _error_line(capsys, "train")
    assert rc == 2
    assert "--batch_size_per_gpu 8" in line and "has 5 images" in line and "--batch_size_per_gpu 5 or less" in line
    assert not out.exists() or _tree(out) == []


def test_train_unreadable_file_list_is_one_line(tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xff\xfe\x00\x81 not text")
    rc, out = _train(tmp_path, lst)
    line = _error_line(capsys, "train")
    assert rc == 2 and str(lst) in line and "cannot read" in line
    assert not out.exists() or _tree(out) == []


@pytest.mark.parametrize("flag,value,expect", [
    ("--attention", "flashy", "--attention 'flashy' is not one of: auto, xformers, flash, flex, sdpa, math"),
    ("--loss_impl", "cuda", "--loss_impl 'cuda' is not one of: auto, triton, torch"),
    ("--ema_impl", "fused", "--ema_impl 'fused' is not one of: auto, triton, foreach, loop"),
    ("--pipeline", "tf", "--pipeline 'tf' is not one of: auto, dali, torch")])
def test_train_backend_names_are_checked_before_anything_is_written(tmp_path, capsys, flag, value, expect):
    write_photos(tmp_path / "four", 4, size=40)
    rc, out = _train(tmp_path, tmp_path / "four", flag, value, "--batch_size_per_gpu", "2")
    assert rc == 2 and expect in _error_line(capsys, "train")
    assert not out.exists()


def test_dali_pipeline_without_dali_is_a_one_line_error(tmp_path, capsys):
    from dino_fast.pipelines.loader import BackendUnavailableError, PipelineError, choose_backend, dali_available
    if dali_available():
        pytest.skip("DALI is installed here")
    write_photos(tmp_path / "four", 4, size=40)
    rc, out = _train(tmp_path, tmp_path / "four", "--pipeline", "dali", "--batch_size_per_gpu", "2")
    assert rc == 2 and "--pipeline dali needs NVIDIA DALI" in _error_line(capsys, "train") and not out.exists()
    import torch
    with pytest.raises(BackendUnavailableError) as err:           # the library: still an ImportError too
        choose_backend("dali", torch.device("cpu"))
    assert isinstance(err.value, ImportError) and isinstance(err.value, PipelineError)


def test_train_output_dir_that_is_a_file(tmp_path, capsys):
    write_photos(tmp_path / "four", 4, size=40)
    (tmp_path / "taken").write_text("a file")
    rc = cli.main(["train", "--data_path", str(tmp_path / "four"), "--output_dir", str(tmp_path / "taken" / "run"),
                   "--device", "cpu", "--batch_size_per_gpu", "2"])
    assert rc == 2 and f"{tmp_path / 'taken'} is a file, not a folder" in _error_line(capsys, "train")
    assert (tmp_path / "taken").read_text() == "a file"


def test_debug_flag_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        cli.main(["--debug", "pack", str(tmp_path / "empty"), str(tmp_path / "dst")])
    with pytest.raises(SourceError):                        # after the command too
        cli.main(["pack", str(tmp_path / "empty"), str(tmp_path / "dst"), "--debug"])


def test_a_bug_is_not_turned_into_a_one_line_error(monkeypatch):
    """Only user errors are shortened: anything else keeps its traceback."""
    from dino_fast.commands import pack
    monkeypatch.setattr(pack, "pack", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["pack", "a", "b"])


# ---------------------------------------------------------------- pack
def test_pack_missing_or_empty_source(tmp_path, capsys):
    assert cli.main(["pack", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "no such file or directory" in _error_line(capsys, "pack")
    (tmp_path / "empty").mkdir()
    assert cli.main(["pack", str(tmp_path / "empty"), str(tmp_path / "dst")]) == 2
    assert "no images found" in _error_line(capsys, "pack")
    assert not (tmp_path / "dst").exists()
    write_photos(tmp_path / "src", 1, size=40)
    (tmp_path / "file").write_text("x")
    assert cli.main(["pack", str(tmp_path / "src"), str(tmp_path / "file")]) == 2
    assert "DST exists and is not a folder" in _error_line(capsys, "pack")
    assert cli.main(["pack", str(tmp_path / "src"), str(tmp_path / "dst"), "--shard-size", "0"]) == 2
    assert "--shard-size 0: must be >= 1" in _error_line(capsys, "pack")


def test_pack_existing_shards_keeps_them(tmp_path, capsys):
    write_photos(tmp_path / "src", 3, size=40)
    assert cli.main(["pack", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    before = {f: os.path.getmtime(tmp_path / "dst" / f) for f in _tree(tmp_path / "dst")}
    capsys.readouterr()
    assert cli.main(["pack", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    line = _error_line(capsys, "pack")
    assert "already holds 1 'shard-*.tar' shards" in line and "--overwrite" in line
    assert {f: os.path.getmtime(tmp_path / "dst" / f) for f in _tree(tmp_path / "dst")} == before


def test_pack_on_error_fail_names_the_file_and_leaves_nothing(tmp_path, capsys):
    write_photos(tmp_path / "src", 4, size=40)
    (tmp_path / "src" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    rc = cli.main(["pack", str(tmp_path / "src"), str(tmp_path / "dst"), "--on-error", "fail",
                   "--shard-size", "1", "--no-shuffle"])     # 4 shards complete before the bad file
    line = _error_line(capsys, "pack")
    assert rc == 2 and "zz_broken.jpg" in line and "--on-error skip" in line
    assert not (tmp_path / "dst").exists()               # created by this run: removed with its shards


def test_pack_on_error_fail_in_an_existing_folder_leaves_it_as_it_was(tmp_path, capsys):
    write_photos(tmp_path / "src", 2, size=40)
    (tmp_path / "src" / "zz_broken.jpg").write_bytes(b"")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    rc = cli.main(["pack", str(tmp_path / "src"), str(tmp_path / "dst"), "--on-error", "fail", "--no-shuffle"])
    assert rc == 2 and "zz_broken.jpg" in _error_line(capsys, "pack")
    assert _tree(tmp_path / "dst") == ["notes.txt"]        # no shard-000000.tar(.tmp), no shard.json


def test_pack_interrupted_removes_the_temporary_shard(tmp_path, monkeypatch):
    from dino_fast.commands import pack as pack_mod
    write_photos(tmp_path / "src", 3, size=40)
    calls = []

    def encoded(data, name, verify=True):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return data, "jpg"
    monkeypatch.setattr(pack_mod, "_encoded", encoded)
    with pytest.raises(KeyboardInterrupt):
        pack_mod.pack(tmp_path / "src", str(tmp_path / "dst"), progress=False)
    assert len(calls) == 2 and not (tmp_path / "dst").exists()


def test_pack_errors_are_user_errors():
    from dino_fast.commands.pack import PackError
    from dino_fast.train.config import ConfigError
    assert issubclass(PackError, UserError) and issubclass(ConfigError, UserError)


def test_console_script_exit_status_and_single_line(tmp_path):
    """The real entry point: stderr is exactly the one error line, exit status 2."""
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "dino_fast.cli", "pack", str(tmp_path / "empty"),
                           str(tmp_path / "dst")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"dino-fast pack: error: {tmp_path / 'empty'}: no images found")
