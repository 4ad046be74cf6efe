"""The loop stops cleanly, with words a user can act on: a non-finite loss (naming the
iteration and the last good checkpoint), --stop_on_collapse, an out-of-memory step,
and it warns when waiting for data dominates the step."""
from __future__ import annotations

import pytest
import torch

import dino_fast.train.loop as loop
from tests.test_train import _one_thread, tiny  # noqa: F401  (fixture)


def test_non_finite_loss_names_iteration_and_checkpoint(tmp_path, monkeypatch):
    real = loop.train_step

    def nan_at_6(st, crops, it, epoch):
        loss = real(st, crops, it, epoch)
        return loss * float("nan") if it == 6 else loss      # a device value: no sync in the step
    monkeypatch.setattr(loop, "train_step", nan_at_6)
    cfg = tiny(tmp_path)
    with pytest.raises(loop.TrainingStopped, match=r"non-finite loss at iteration 6 \(epoch 2\); the last good "
                                                   r"checkpoint is .*checkpoint.pth"):
        loop.train(cfg)
    ck = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 1                                   # epoch 2 never saved its poisoned weights


def test_stop_on_collapse(tmp_path, monkeypatch):
    from dino_fast.runtime import health
    monkeypatch.setattr(health.CollapseMonitor, "update", lambda self, stats, epoch, context=None:
                        "DINO collapse warning: UNIFORM collapse" if epoch == 1 else None)
    with pytest.raises(loop.TrainingStopped, match=r"UNIFORM collapse\nStopped \(--stop_on_collapse\); the last "
                                                   r"good checkpoint is .*checkpoint.pth"):
        loop.train(tiny(tmp_path, stop_on_collapse=True))
    summary = loop.train(tiny(tmp_path, "warn_only"))        # without the flag: a warning, the run goes on
    assert any("UNIFORM collapse" in w for w in summary["warnings"]) and len(summary["epochs"]) == 2


def test_out_of_memory_is_explained(tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop, "train_step", oom)
    with pytest.raises(RuntimeError) as info:
        loop.train(tiny(tmp_path, epochs=1))
    text = str(info.value)
    assert type(info.value).__name__ == "TrainingOutOfMemoryError"
    assert "grad_accum_steps" in text and "activation_checkpointing" in text and "local_crops_number" in text


def test_data_time_warning(tmp_path, monkeypatch):
    import time
    real_timed = loop._timed

    class Slow:                                               # a slow pipeline
        def __init__(self, loader):
            self.timed = real_timed(loader)

        def __iter__(self):
            for batch, waited in self.timed:
                time.sleep(0.3)
                yield batch, waited + 0.3

        def take(self):
            return self.timed.take()
    monkeypatch.setattr(loop, "_timed", Slow)
    summary = loop.train(tiny(tmp_path, log_interval=1, epochs=1, pipeline="torch"))   # the workers advice
    assert any("waiting for data takes" in w and "pipeline backend 'torch'" in w and "--num_workers" in w
               for w in summary["warnings"])
