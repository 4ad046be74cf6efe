"""Progress of a run: one bar for the whole run on a terminal; without one (nohup, SLURM,
a pipe) a log line every PROGRESS_EVERY_STEPS steps or PROGRESS_EVERY_S seconds with the
iteration, loss, img/s and ETA."""
from __future__ import annotations

import logging
import re

from dino_fast.train import logger as logger_mod
from dino_fast.train.logger import RunLogger, format_eta


def _run(tmp_path, monkeypatch, tty: bool, epochs=2, steps=10, log_interval=2):
    monkeypatch.setattr(logger_mod.sys.stderr, "isatty", lambda: tty, raising=False)
    clock = [100.0]
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: clock[0])
    lg = RunLogger(str(tmp_path), True, epochs, steps)
    it = 0
    for epoch in range(epochs):
        lg.start_epoch(epoch)
        for _ in range(steps):
            clock[0] += 0.5                          # 0.5 s per step
            it += 1
            lg.advance()
            if it % log_interval == 0:
                lg.step({"epoch": epoch, "it": it, "loss": 10.0 / it, "img_s": 64.0, "mfu": 0.0,
                         "data_time_frac": 0.0})
        lg.end_epoch()
    return lg


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(logger_mod, "PROGRESS_EVERY_STEPS", 6)
    monkeypatch.setattr(logger_mod, "PROGRESS_EVERY_S", 1e9)
    with caplog.at_level(logging.INFO, logger="dino_fast.train.logger"):
        lg = _run(tmp_path, monkeypatch, tty=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration")]
    its = [int(re.match(r"iteration (\d+)/20", m).group(1)) for m in lines]
    # the first logging step, then every 6 steps (checked at logging steps), and the last
    assert its == [2, 8, 14, 20], lines
    # at 0.5 s per step: after 8 of 20 steps, 12 remain = 6 s
    assert "iteration 8/20 (epoch 1/2): loss 1.2500, 64.0 img/s, ETA 6 s" in lines
    assert lines[-1].endswith("ETA 0 s") and "(epoch 2/2)" in lines[-1]
    assert lg._bar is None


def test_progress_lines_every_m_seconds(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(logger_mod, "PROGRESS_EVERY_STEPS", 10**9)
    monkeypatch.setattr(logger_mod, "PROGRESS_EVERY_S", 2.9)       # 6 steps = 3 s
    with caplog.at_level(logging.INFO, logger="dino_fast.train.logger"):
        _run(tmp_path, monkeypatch, tty=False)
    its = [int(m.split()[1].split("/")[0]) for m in (r.getMessage() for r in caplog.records)
           if m.startswith("iteration")]
    assert its == [2, 8, 14, 20]


def test_terminal_gets_one_bar_for_the_whole_run_and_no_lines(tmp_path, monkeypatch, caplog):
    bars = []
    import tqdm.auto

    class Bar:
        def __init__(self, total, initial, **kw):
            self.total, self.n, self.closed, self.desc = total, initial, False, ""
            bars.append(self)

        def set_description(self, desc, refresh=True):
            self.desc = desc

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            pass

        def close(self):
            self.closed = True
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    with caplog.at_level(logging.INFO, logger="dino_fast.train.logger"):
        _run(tmp_path, monkeypatch, tty=True)
    assert len(bars) == 1 and bars[0].total == 20 and bars[0].n == 20 and bars[0].closed
    assert bars[0].desc == "epoch 2/2"
    assert not [r for r in caplog.records if r.getMessage().startswith("iteration")]


def test_format_eta():
    assert [format_eta(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
