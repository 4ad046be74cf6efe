"""Clean interruptions: SIGTERM and SIGINT mid-step and mid-save (a `dino-fast train` subprocess paused
at that point by a patch in its script, then signalled by the test) exit 143 / 130 with one line saying
where the run stopped, leave no partial file, and the same command resumes to the weights of the
uninterrupted run, bit for bit; stale temp files are removed at the next start, a periodic copy is never
missing; under 2 gloo processes a signal reaching one rank stops both at the same step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dino_fast.cli import main
from tests._dist import run_distributed
from tests.test_resume_check import _one_thread, argv, finished, half  # noqa: F401 (fixtures)
from tests.test_train import TINY, records

pytestmark = pytest.mark.usefixtures("_one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `dino-fast train ARGV` with a pause at step N (inside the step, after the backward) or in the
# N-th checkpoint write (the temp file written, not yet renamed); the pause lasts until the test
# removes the marker file, which it does right after sending the signal.
_SCRIPT = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
argv, where, n, marker = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]

def pause():
    open(marker, "w").close()
    t0 = time.time()
    while os.path.exists(marker) and time.time() - t0 < 60:
        time.sleep(0.01)

calls = [0]
if where == "step":
    import dino_fast.train.step as step
    clip = step.clip_gradients
    def clip_gradients(model, c):
        if calls[0] == n:
            pause()
        calls[0] += 1
        return clip(model, c)
    step.clip_gradients = clip_gradients
else:
    save = torch.save
    def paused_save(obj, f, *a, **k):
        save(obj, f, *a, **k)
        calls[0] += 1
        if calls[0] == n:
            f.flush()
            pause()
    torch.save = paused_save
from dino_fast.cli import main
sys.exit(main(argv))
"""


def interrupted_run(out_dir, sig, where: str, n: int):
    """(exit code, stderr) of the run signalled while paused at `where` n."""
    marker = str(out_dir) + ".paused"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps(argv(out_dir)), where, str(n), marker],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert os.path.exists(marker), "the run never reached the pause"
    proc.send_signal(sig)
    os.remove(marker)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def interrupted_in_process(out_dir, sig, where: str, n: int, monkeypatch, capsys):
    """The same, in this process: the run sends itself the signal at the pause point."""
    calls = [0]

    def hit():
        calls[0] += 1
        if calls[0] == n + (where == "step"):
            os.kill(os.getpid(), sig)
    if where == "step":
        import dino_fast.train.step as step
        clip = step.clip_gradients
        monkeypatch.setattr(step, "clip_gradients", lambda model, c: (hit(), clip(model, c))[1])
    else:
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (save(obj, f, *a, **k), hit())[0])
    rc = main(argv(out_dir))
    monkeypatch.undo()
    return rc, capsys.readouterr().err


def same_weights(a_dir, b_dir, name="checkpoint.pth"):
    a = torch.load(os.path.join(a_dir, name), weights_only=True)
    b = torch.load(os.path.join(b_dir, name), weights_only=True)
    assert a["epoch"] == b["epoch"] and a["it"] == b["it"]
    for part in ("student", "teacher", "dino_loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def leftovers(out_dir):
    return [n for n in os.listdir(out_dir) if ".tmp" in n or n.endswith(".old")]


@pytest.mark.parametrize("sig, code, where, n, said, subprocess_", [
    (signal.SIGTERM, 143, "step", 5, "at step 6; rerun the same command to resume from {ck} (1 epoch done; "
                                     "the 2 steps after it are redone)", True),
    (signal.SIGINT, 130, "step", 1, "at step 2; rerun the same command to resume from the start (no checkpoint "
                                    "yet: the 2 steps are redone)", False),
    (signal.SIGTERM, 143, "save", 1, "at step 4; rerun the same command to resume from {ck} (1 epoch done, "
                                     "nothing lost)", False),
    (signal.SIGINT, 130, "save", 1, "at step 4; rerun the same command to resume from {ck} (1 epoch done, "
                                    "nothing lost)", True),
    (signal.SIGUSR1, 138, "step", 6, "at step 7; rerun the same command to resume from {ck} (1 epoch done; "
                                     "the 3 steps after it are redone)", False),   # SLURM --signal=USR1@120
], ids=["SIGTERM-mid-step-subprocess", "SIGINT-mid-step", "SIGTERM-mid-save", "SIGINT-mid-save-subprocess",
        "SIGUSR1-mid-step"])
def test_signal_stops_cleanly_and_the_same_command_resumes(finished, tmp_path, sig, code, where, n, said,  # noqa: F811
                                                           subprocess_, monkeypatch, capsys):
    out = tmp_path / "run"
    rc, err = (interrupted_run(out, sig, where, n) if subprocess_ else
               interrupted_in_process(out, sig, where, n, monkeypatch, capsys))
    lines = [ln for ln in err.splitlines() if ln.startswith("dino-fast train:")]
    assert rc == code, err
    assert "Traceback" not in err, err
    name = signal.Signals(sig).name
    assert lines[-1] == f"dino-fast train: interrupted ({name}) " + said.format(ck=out / "checkpoint.pth")
    assert leftovers(out) == []
    if where == "save":   # the checkpoint being written when the signal came was completed
        assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
        same_weights(finished, out, "checkpoint0000.pth")
    assert main(argv(out)) == 0                       # the same command
    same_weights(finished, out)
    assert [r["loss"] for r in records(out, "step")] == [r["loss"] for r in records(finished, "step")]


class _Killed(Exception):
    pass


def test_stale_files_removed_and_a_periodic_copy_never_missing(finished, tmp_path, monkeypatch):  # noqa: F811
    from dino_fast.train import checkpoint
    out = half(finished, tmp_path / "half")
    debris = ["checkpoint.pth.tmp.4242", "checkpoint0001.pth.tmp", "checkpoint0001.pth.tmp.17", "config.json.tmp.9",
              "log.jsonl.tmp.3", "checkpoint.tmp", "checkpoint0001.tmp.17"]
    for d in debris:
        if d.endswith(".pth.tmp") or ".pth." in d or d.startswith(("config", "log")):
            (out / d).write_bytes(b"half written")
        else:
            os.makedirs(out / d)
            (out / d / "__0_0.distcp").write_bytes(b"x")
    (out / "notes.tmp").write_text("the user's")
    # a kill while the epoch-2 copy is written: the main checkpoint is not advanced yet
    copy = checkpoint.atomic_copy

    def killed_copy(src, dst):
        with open(f"{dst}.tmp.{os.getpid()}", "wb") as f:
            f.write(b"partial")
        raise _Killed
    monkeypatch.setattr(checkpoint, "atomic_copy", killed_copy)
    with pytest.raises(_Killed):
        main(argv(out))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not os.path.exists(out / "checkpoint0001.pth")
    monkeypatch.setattr(checkpoint, "atomic_copy", copy)
    assert main(argv(out)) == 0                       # redoes epoch 2 and makes its copy
    assert sorted(os.listdir(out)) == sorted(["checkpoint.pth", "checkpoint0001.pth", "config.json", "log.jsonl",
                                              "loss_curve.png", "notes.tmp"])
    same_weights(finished, out)
    same_weights(finished, out, "checkpoint0001.pth")                 # the copy, as the uninterrupted run's


def _two_ranks(rank, world, out_dir, result_dir):
    import dino_fast.train.step as step
    from dino_fast.train.interrupt import Interrupted
    from dino_fast.train.loop import train
    from dino_fast.train.presets import resolve
    torch.set_num_threads(1)
    cfg = {**TINY, "batch_size_per_gpu": 4, "output_dir": out_dir}
    if rank == 1:   # only rank 1 gets the signal, during step 5 (the window closes at step 6)
        clip, calls = step.clip_gradients, [0]

        def clip_gradients(model, c):
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            calls[0] += 1
            return clip(model, c)
        step.clip_gradients = clip_gradients
    try:
        train(resolve("demo", cfg))
        result = "not interrupted"
    except Interrupted as exc:
        result = f"{exc.exit_code} {exc}"
    if rank == 1:
        step.clip_gradients = clip
    torch.distributed.barrier()
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{result}\n{sorted(os.listdir(out_dir))}")
    torch.distributed.barrier()
    summary = train(resolve("demo", cfg))               # the same command resumes
    if rank == 0:
        with open(os.path.join(result_dir, "resumed.json"), "w") as f:
            json.dump({"start_epoch": summary["start_epoch"]}, f)


def test_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "two"
    run_distributed(_two_ranks, str(out), str(tmp_path), world_size=2)
    r0, r1 = (open(tmp_path / f"rank{r}.txt").read().split("\n") for r in (0, 1))
    assert r0[0] == r1[0], (r0, r1)
    assert r0[0].startswith("143 interrupted (SIGTERM) at step 6; rerun the same command to resume from "), r0
    assert "(1 epoch done; the 2 steps after it are redone)" in r0[0]
    assert "checkpoint.tmp" not in r0[1] and "checkpoint.old" not in r0[1]
    assert json.load(open(tmp_path / "resumed.json"))["start_epoch"] == 1
    assert os.path.isfile(out / "checkpoint" / ".metadata") and leftovers(out) == []
    assert [r["it"] for r in records(out, "step")] == [2, 4, 6, 8]
