"""End-to-end training on CPU: a short demo run, resume == uninterrupted (exact),
a 2-process gloo FSDP2 run == the 1-process run (and its sharded checkpoint
resumed on 1 process), a kill -9 during a checkpoint write."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dino_fast.train import checkpoint
from dino_fast.train.presets import resolve
from tests._dist import run_distributed

# A tiny run: 2-block ViT-tiny/4 on 16 px global + 8 px local crops of 32 demo images.
TINY = dict(patch_size=4, depth=2, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, global_size=16, local_size=8,
            local_crops_number=2, batch_size_per_gpu=8, max_images=32, epochs=2, warmup_epochs=1,
            lr=0.005, log_interval=2, num_workers=0, knn_eval=False, drop_path_rate=0.0, saveckp_freq=1,
            momentum_teacher=0.9, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning makes 2 threads ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, name="run", **kw):
    return resolve("demo", {**TINY, "output_dir": str(tmp_path / name), **kw})


def records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def test_demo_run_writes_everything_and_loss_decreases(tmp_path):
    from dino_fast.train.loop import train
    cfg = tiny(tmp_path, epochs=4)
    summary = train(cfg)
    out = cfg.output_dir
    steps = records(out, "step")
    losses = [r["loss"] for r in steps]
    assert len(steps) == 4 * 2 and len(records(out, "epoch")) == 4          # 4 steps/epoch, log every 2
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses                             # it learns
    for key in ("img_s", "mfu", "data_time_frac", "lr", "teacher_entropy", "kl", "center_norm"):
        assert key in steps[-1], key
    assert 0.0 <= steps[-1]["data_time_frac"] <= 1.0
    assert [r["it"] for r in steps] == [2, 4, 6, 8, 10, 12, 14, 16]
    for name in ("checkpoint.pth", "checkpoint0000.pth", "checkpoint0003.pth", "loss_curve.png", "config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    ck = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert set(ck) >= {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}     # reference layout
    assert ck["epoch"] == 4 and ck["it"] == 16 and ck["args"]["arch"] == "vit_tiny"
    assert json.load(open(os.path.join(out, "config.json")))["depth"] == 2
    assert summary["step_losses"] == losses


class _Interrupt(Exception):
    pass


def test_resume_is_bit_for_bit(tmp_path, monkeypatch):
    from dino_fast.train.loop import train
    full = train(tiny(tmp_path, "full"))
    # the same run, killed right after the first epoch's checkpoint, then started again
    save = checkpoint.save

    def save_then_die(*a, **k):
        save(*a, **k)
        raise _Interrupt
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Interrupt):
        train(tiny(tmp_path, "cut"))
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = train(tiny(tmp_path, "cut"))
    assert resumed["start_epoch"] == 1
    assert records(tmp_path / "cut", "step") and \
        [r["loss"] for r in records(tmp_path / "cut", "step")] == [r["loss"] for r in records(tmp_path / "full", "step")]
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    for part in ("student", "teacher", "dino_loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert full["epochs"][-1]["loss"] == resumed["epochs"][-1]["loss"]
    assert [r["loss"] for r in records(tmp_path / "cut", "epoch")] == \
        [r["loss"] for r in records(tmp_path / "full", "epoch")]                  # the log continues cleanly


def _fsdp_rank(rank, world, out_dir):
    from dino_fast.train.loop import train
    torch.set_num_threads(1)
    cfg = resolve("demo", {**TINY, "batch_size_per_gpu": TINY["batch_size_per_gpu"] // world,
                           "output_dir": out_dir})
    train(cfg)


def test_fsdp_two_processes_match_one_and_reshard(tmp_path):
    from dino_fast.train.loop import train
    one = train(tiny(tmp_path, "one"))
    run_distributed(_fsdp_rank, str(tmp_path / "two"), world_size=2)
    assert os.path.isfile(tmp_path / "two" / "checkpoint" / ".metadata")          # sharded (DCP)
    assert os.path.isdir(tmp_path / "two" / "checkpoint0000")
    l1 = [r["loss"] for r in records(tmp_path / "one", "step")]
    l2 = [r["loss"] for r in records(tmp_path / "two", "step")]
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=2e-4, abs=2e-4)
    # resume the 2-process sharded checkpoint of epoch 1 on a single process
    os.makedirs(tmp_path / "re")
    os.rename(tmp_path / "two" / "checkpoint0000", tmp_path / "re" / "checkpoint")
    re = train(tiny(tmp_path, "re"))
    assert re["start_epoch"] == 1
    assert re["epochs"][-1]["loss"] == pytest.approx(one["epochs"][-1]["loss"], rel=2e-4, abs=2e-4)


_WRITER = r"""
import sys, torch
from dino_fast.train.checkpoint import atomic_torch_save
path = sys.argv[1]
atomic_torch_save({"epoch": 1, "w": torch.arange(10.)}, path)
print("first", flush=True)
atomic_torch_save({"epoch": 2, "w": torch.zeros(96 * 2**20)}, path)   # 384 MB: killed while writing
print("second", flush=True)
"""


def test_kill_during_checkpoint_write_leaves_last_good(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    deadline = time.time() + 120
    tmp = f"{path}.tmp.{proc.pid}"
    while not (os.path.exists(tmp) and os.path.getsize(tmp) > 0) and time.time() < deadline:
        time.sleep(0.001)
    proc.kill()                                                                   # SIGKILL mid-write
    proc.wait()
    assert os.path.exists(tmp), "the kill did not land during the write"
    ck = torch.load(path, weights_only=True)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(10.0))
    assert checkpoint.find(str(tmp_path)) == path
