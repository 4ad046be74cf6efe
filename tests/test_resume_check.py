"""Resume validation through the command line (`dino-fast train` in this process): a checkpoint of
another run stops with one line naming the fields, the old and new values and the fixes (exit 2),
a finished run says it is complete (exit 0), and in both cases nothing in the output folder changes;
safe differences (another world size with the same global batch, over 2 gloo processes; workers;
logging) and --extend_epochs are accepted and said."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from dino_fast.cli import main
from tests._dist import run_distributed
from tests.test_train import TINY, records

pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def argv(out_dir, **kw) -> list[str]:
    """`train --preset demo` with the tiny run's flags (tests/test_train.py TINY)."""
    out = ["train", "--preset", "demo", "--output_dir", str(out_dir)]
    for k, v in {**TINY, **kw}.items():
        if isinstance(v, bool):
            out += [f"--{k}", str(v).lower()]
        elif isinstance(v, tuple):
            out += [f"--{k}", *map(str, v)]
        else:
            out += [f"--{k}", str(v)]
    return out


def folder_hash(path) -> dict:
    """name -> (sha256, mtime_ns) of every file under path: content and rewrites both show."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete 2-epoch run (checkpoint.pth + checkpoint0000.pth, the state after epoch 1)."""
    out = tmp_path_factory.mktemp("resume") / "done"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(argv(out)) == 0
    torch.set_num_threads(n)
    return out


def half(finished, dst):
    """The same run stopped after epoch 1 (its epoch-1 copy as the checkpoint, the log up to there)."""
    os.makedirs(dst)
    shutil.copyfile(finished / "checkpoint0000.pth", dst / "checkpoint.pth")
    shutil.copyfile(finished / "config.json", dst / "config.json")
    shutil.copyfile(finished / "log.jsonl", dst / "log.jsonl")   # the resume drops the records past epoch 1
    return dst


def refused(out, capsys, *flags_and_kw, **kw):
    before = folder_hash(out)
    code = main(argv(out, **kw) + list(flags_and_kw))
    err = capsys.readouterr().err.strip().splitlines()
    assert folder_hash(out) == before, "the output folder changed"
    return code, err[-1], err


def test_bigger_and_smaller_batch(finished, tmp_path, capsys):
    out = half(finished, tmp_path / "half")
    for b in (16, 4):
        code, line, _ = refused(out, capsys, batch_size_per_gpu=b)
        assert code == 2
        assert f"global batch (batch_size_per_gpu x world size) 8 (8 x 1) -> {b} ({b} x 1)" in line, line
        assert "--batch_size_per_gpu 8 to continue it" in line and "--resume false" in line
        assert "another --output_dir" in line and "epoch 1" in line


def test_other_data(finished, tmp_path, capsys):
    from PIL import Image
    photos = tmp_path / "myphotos"
    os.makedirs(photos)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    code, line, _ = refused(finished, capsys, data_path=str(photos), max_images=0)
    assert code == 2 and f"data_path demo -> {os.path.realpath(photos)}" in line and "--data_path demo" in line
    code, line, _ = refused(finished, capsys, max_images=24)       # the same source, fewer images
    assert code == 2 and "number of images 32 -> 24" in line and "--max_images 32" in line, line


def test_other_arch_and_head(finished, capsys):
    code, line, _ = refused(finished, capsys, arch="vit_small", out_dim=128)
    assert code == 2
    assert "arch vit_tiny -> vit_small" in line and "out_dim 64 -> 128" in line, line
    assert "--arch vit_tiny --out_dim 64 to continue it" in line


def test_finished_run_says_complete(finished, capsys):
    code, line, err = refused(finished, capsys)
    assert code == 0
    assert "is complete (2/2 epochs, iteration 8" in line and "--epochs N --extend_epochs with N > 2" in line
    assert not any("Traceback" in e for e in err)


def test_more_epochs_need_extend_epochs(finished, tmp_path, capsys):
    code, line, _ = refused(finished, capsys, epochs=3)
    assert code == 2 and "epochs 2 -> 3 (to train longer on purpose add --extend_epochs)" in line, line
    code, line, _ = refused(finished, capsys, epochs=1)
    assert code == 2 and "epochs 2 -> 1" in line and "--epochs 2" in line
    # --extend_epochs: accepted, schedules rebuilt for 3 epochs, training goes on at iteration 8
    out = tmp_path / "longer"
    shutil.copytree(finished, out)
    assert main(argv(out, epochs=3) + ["--extend_epochs"]) == 0
    steps = records(out, "step")
    assert [r["it"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 3

    def cosine(base, final, it, total, warmup):     # the reference cosine_scheduler, written out
        if it < warmup:
            return base * it / warmup
        return final + 0.5 * (base - final) * (1 + np.cos(np.pi * (it - warmup) / (total - warmup)))
    base_lr = TINY["lr"] * TINY["batch_size_per_gpu"] / 256
    for r in steps[-2:]:
        assert r["lr"] == pytest.approx(cosine(base_lr, 1e-5, r["it"] - 1, 12, 4), rel=1e-6)
        assert r["momentum"] == pytest.approx(cosine(0.9, 1.0, r["it"] - 1, 12, 0), rel=1e-6)


def test_safe_differences_accepted_and_said(finished, tmp_path, capsys, caplog):
    out = half(finished, tmp_path / "half")
    with caplog.at_level(logging.INFO, logger="dino_fast.train.loop"):
        assert main(argv(out, num_workers=1, log_interval=4, grad_accum_steps=2)) == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "resumed from" in said and "accepted: num_workers 0 -> 1" in said
    assert "accepted: log_interval 2 -> 4" in said and "accepted: grad_accum_steps 1 -> 2" in said
    a = torch.load(finished / "checkpoint.pth", weights_only=True)
    b = torch.load(out / "checkpoint.pth", weights_only=True)
    assert b["epoch"] == 2
    for k in a["teacher"]:   # accumulation splits the batch: the same step up to rounding
        torch.testing.assert_close(b["teacher"][k], a["teacher"][k], rtol=1e-4, atol=1e-5)


def _world_two(rank, world, out_dir, result_dir):
    from dino_fast.train.loop import train
    from dino_fast.train.presets import resolve
    from dino_fast.train.resume_check import ResumeMismatch
    torch.set_num_threads(1)
    before = folder_hash(out_dir) if rank == 0 else None
    try:   # 8 per process on 2 processes: global batch 16 instead of 8
        train(resolve("demo", {**TINY, "output_dir": out_dir}))
        message = "accepted"
    except ResumeMismatch as exc:
        message = str(exc)
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(result_dir, "refused.txt"), "w") as f:
            f.write(f"{folder_hash(out_dir) == before}\n{message}")
    torch.distributed.barrier()
    caught = []
    handler = logging.Handler()
    handler.emit = lambda r: caught.append(r.getMessage())
    logging.getLogger("dino_fast.train.loop").addHandler(handler)
    logging.getLogger("dino_fast.train.loop").setLevel(logging.INFO)
    summary = train(resolve("demo", {**TINY, "batch_size_per_gpu": 4, "output_dir": out_dir}))  # same global batch
    if rank == 0:
        torch.save({"summary": summary, "log": caught}, os.path.join(result_dir, "accepted.pt"))


def test_other_world_size_with_the_same_global_batch(finished, tmp_path):
    out = half(finished, tmp_path / "half")
    run_distributed(_world_two, str(out), str(tmp_path), world_size=2)
    same, message = open(tmp_path / "refused.txt").read().split("\n", 1)
    assert same == "True", "the refused resume changed the output folder"
    assert "global batch (batch_size_per_gpu x world size) 8 (8 x 1) -> 16 (8 x 2)" in message, message
    assert "--batch_size_per_gpu 4 to continue it" in message
    got = torch.load(tmp_path / "accepted.pt", weights_only=False)
    assert got["summary"]["start_epoch"] == 1
    assert any("accepted: world size 1 -> 2 with the same global batch 8 (8 x 1 -> 4 x 2)" in m for m in got["log"])
    # epoch 2 on 2 processes from the 1-process checkpoint matches the 1-process run (up to the
    # summation order of the gradient reduction, which grows over the steps: 5e-4 measured at the last)
    l1 = [r["loss"] for r in records(finished, "step")]
    l2 = [r["loss"] for r in records(out, "step")]
    assert l2[:2] == l1[:2] and l2[2:] == pytest.approx(l1[2:], rel=1.5e-3)
    assert os.path.isfile(out / "checkpoint" / ".metadata")


def test_checkpoint_of_an_older_version_without_the_record(finished):
    """Checkpoints written before the record (and before newer fields) compare on their config alone;
    a field missing from them counts as its default."""
    from dino_fast.train.presets import resolve
    from dino_fast.train.resume_check import compare, read_saved
    saved = read_saved(str(finished / "checkpoint.pth"))
    assert saved["args"]["resume"] == {"global_batch": 8, "world_size": 1, "batch_size_per_gpu": 8, "n_images": 32,
                                       "data": "demo", "steps_per_epoch": 4, "epochs": 2}
    for key in ("resume", "extend_epochs", "monitor_every", "norm_eps"):
        saved["args"].pop(key)
    cfg = resolve("demo", {**TINY, "output_dir": str(finished)})
    assert compare(cfg, saved, 1, 32)[:2] == ([], [])
    bad, fixes, _ = compare(resolve("demo", {**TINY, "output_dir": str(finished), "norm_eps": 1e-3}), saved, 1, 32)
    assert bad == [("norm_eps", 0.0, 1e-3)] and fixes == ["--norm_eps 0.0"]
    bad, _, _ = compare(cfg, saved, 1, 32 * 2)          # without the record the image count is unknown
    assert bad == []
