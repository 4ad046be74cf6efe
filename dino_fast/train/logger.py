"""What a person reads during and after a run: one progress bar for the whole run
(epoch, loss, img/s, MFU, data-time share, ETA of the run) on a terminal, or
where no terminal is (nohup, SLURM, a pipe) a progress line every
`PROGRESS_EVERY_STEPS` steps or `PROGRESS_EVERY_S` seconds, whichever comes
first (iteration, loss, img/s, ETA); a JSON-lines log (`log.jsonl`: one record
per logging step and per epoch) and a loss-curve PNG (`loss_curve.png`).
Only rank 0 writes. The caller hands over host numbers (read once per logging
step), so nothing here touches the device.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

DATA_TIME_WARN = 0.2      # warn when waiting for data takes more than this share of the step
DATA_TIME_PATIENCE = 3    # ... for this many logging steps in a row
PROGRESS_EVERY_STEPS = 100   # without a terminal: a progress line after this many steps ...
PROGRESS_EVERY_S = 30.0      # ... or this many seconds, whichever comes first (at a logging step)


def format_eta(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class RunLogger:
    def __init__(self, output_dir: str, enabled: bool, epochs: int, steps_per_epoch: int,
                 pipeline_backend: str = "?", resume_it: int = 0):
        self.output_dir, self.enabled = output_dir, enabled
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.pipeline_backend = pipeline_backend
        self.path = os.path.join(output_dir, "log.jsonl")
        self.png = os.path.join(output_dir, "loss_curve.png")
        self.losses: list[float] = []
        self.loss_its: list[int] = []          # the iteration of each logged loss (x of the curve)
        self.epoch_losses: list[float] = []
        self.monitors: list[dict] = []         # k-NN monitor records (--monitor_knn)
        self._bar = None
        self._epoch = 0
        self.total_steps = epochs * steps_per_epoch
        self.start_it = self.it = resume_it     # iterations done (this run's part starts at start_it)
        self._t0 = None                         # wall clock at this run's first step
        self._line_it, self._line_t = resume_it, None   # last non-terminal progress line
        self.tty = sys.stderr.isatty()
        self._slow_data = 0
        self.warnings: list[str] = []
        if enabled and os.path.exists(self.path):
            # a resumed run keeps the records up to the checkpoint's iteration and drops the rest
            # (written after the last checkpoint by the interrupted run; they are about to be redone)
            with open(self.path) as f:
                kept = [r for r in map(json.loads, f) if resume_it and r.get("it", 0) <= resume_it]
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
            steps = [r for r in kept if r.get("type") == "step"]
            self.losses, self.loss_its = [r["loss"] for r in steps], [r.get("it", i) for i, r in enumerate(steps)]
            self.epoch_losses = [r["loss"] for r in kept if r.get("type") == "epoch"]
            self.monitors = [r for r in kept if r.get("type") == "monitor"]

    # ---- progress: one bar for the whole run on a terminal, lines in log files ----
    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if not self.enabled:
            return
        if self._t0 is None:
            self._t0 = self._line_t = time.perf_counter()
        if not self.tty:
            return
        if self._bar is None:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total_steps, initial=self.start_it, unit="step", dynamic_ncols=True,
                             leave=True, file=sys.stderr)
        self._bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)

    def advance(self, n: int = 1) -> None:
        self.it += n
        if self._bar is not None:
            self._bar.update(n)

    def end_epoch(self) -> None:
        if self._bar is not None and self._epoch + 1 >= self.epochs:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def eta_s(self) -> float:
        """Seconds left in the run at this run's mean step time so far."""
        done = self.it - self.start_it
        if not done or self._t0 is None:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total_steps - self.it)

    def _progress_line(self, record: dict) -> None:
        """Without a terminal: one line every PROGRESS_EVERY_STEPS steps or PROGRESS_EVERY_S seconds."""
        now = time.perf_counter()
        first = self._line_it == self.start_it
        due = (self.it - self._line_it >= PROGRESS_EVERY_STEPS or now - self._line_t >= PROGRESS_EVERY_S
               or self.it >= self.total_steps)
        if not (first or due):
            return
        self._line_it, self._line_t = self.it, now
        log.info("iteration %d/%d (epoch %d/%d): loss %.4f, %.1f img/s, ETA %s", self.it, self.total_steps,
                 self._epoch + 1, self.epochs, record["loss"], record["img_s"], format_eta(self.eta_s()))

    # ---- records ----
    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, record: dict) -> None:
        """One logging-step record (type 'step')."""
        self._check_data_time(record.get("data_time_frac", 0.0))
        if not self.enabled:
            return
        self.losses.append(record["loss"])
        self.loss_its.append(record.get("it", len(self.loss_its)))
        self._write({"type": "step", **record})
        if not self.tty:
            self._progress_line(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_s']:.1f}",
                                  mfu=f"{100 * record['mfu']:.1f}%", data=f"{record['data_time_frac']:.2f}",
                                  H_t=f"{record.get('teacher_entropy', float('nan')):.2f}", refresh=False)

    def epoch(self, record: dict) -> None:
        """One end-of-epoch record (type 'epoch'); redraws the loss curve."""
        if not self.enabled:
            return
        self.epoch_losses.append(record["loss"])
        self._write({"type": "epoch", **record})
        self.plot()

    def monitor(self, record: dict) -> None:
        """One k-NN monitor record (type 'monitor'); redraws the curves."""
        if not self.enabled:
            return
        record = {"type": "monitor", **record}
        self.monitors.append(record)
        self._write(record)
        self.plot()

    def plot(self) -> None:
        from dino_fast.plot import line_chart
        if not self.losses:
            return
        below = None
        if self.monitors:   # the monitor's k-NN accuracy in a panel under the loss, same iteration axis
            its = [r["it"] for r in self.monitors]
            below = dict(series={"top-1": [r["monitor_knn_top1"] for r in self.monitors],
                                 "top-5": [r["monitor_knn_top5"] for r in self.monitors]},
                         xs={"top-1": its, "top-5": its}, ylabel="%",
                         title=f"teacher weighted {self.monitors[-1].get('monitor_knn_k', 20)}-NN (--monitor_knn)")
        line_chart(self.png, {"loss (per logging step)": self.losses}, title="DINO training loss",
                   xlabel="iteration", ylabel="loss", xs={"loss (per logging step)": self.loss_its}, below=below)

    def _check_data_time(self, frac: float) -> None:
        self._slow_data = self._slow_data + 1 if frac > DATA_TIME_WARN else 0
        if self._slow_data == DATA_TIME_PATIENCE:
            msg = (f"waiting for data takes {100 * frac:.0f}% of each step's wall time (pipeline backend "
                   f"'{self.pipeline_backend}'): the model is starved of images. ")
            msg += ("Use --pipeline dali (GPU decode and augmentation), " if self.pipeline_backend != "dali"
                    else "Raise the DALI threads / prefetch, ")
            msg += ("raise --num_workers, or pack the images into tar shards (`dino-fast pack`) "
                    "so reading is sequential.")
            self.warnings.append(msg)
            log.warning(msg)
