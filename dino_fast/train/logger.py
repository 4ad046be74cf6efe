"""What a person reads during and after a run: a progress bar per epoch (loss,
img/s, MFU, data-time share, ETA), a JSON-lines log (`log.jsonl`: one record
per logging step and per epoch) and a loss-curve PNG (`loss_curve.png`).
Only rank 0 writes. The caller hands over host numbers (read once per logging
step), so nothing here touches the device.
"""
from __future__ import annotations

import json
import logging
import os
import sys

log = logging.getLogger(__name__)

DATA_TIME_WARN = 0.2      # warn when waiting for data takes more than this share of the step
DATA_TIME_PATIENCE = 3    # ... for this many logging steps in a row


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

    # ---- progress bar ----
    def start_epoch(self, epoch: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm
        self._bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step",
                         dynamic_ncols=True, leave=True, file=sys.stderr, disable=None)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

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
