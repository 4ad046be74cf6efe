"""Clean interruptions: SIGINT (Ctrl-C), SIGTERM (kill, SLURM pre-emption and time limit) and SIGUSR1
(SLURM's `--signal=USR1@<seconds>` warning) stop a run at a step boundary, with a checkpoint that is
complete and consistent over ranks, a one-line message and exit 128 + the signal (130, 143, 138).

- Before the epoch loop (setup, data scan, model build) a signal stops at once (`Interrupted`):
  nothing is trained, and nothing half-written is left (every write is a temp file + rename).
- In the loop (`arm`) the handler only records the signal. The current step finishes; a checkpoint
  being written finishes too. One process stops after that step. With several processes the signal
  may reach only some ranks (or reach them at different steps), so the ranks agree first: at the
  next logging window (a host sync already) and after each checkpoint, one all-reduce of the flag
  (MAX), so every rank stops at the same iteration and none waits in a collective for a peer that
  left. Nothing is read on the host inside a step.
- The run then continues from the last checkpoint (epoch ends): rerunning the same command
  resumes it; the steps after that checkpoint are redone, bit-for-bit on the CPU.
- A second signal while stopping acts at once (no step boundary waited for).
- Forked data-loading workers inherit the handler and ignore the signal (Ctrl-C reaches the whole
  process group): they keep feeding the batches the last steps need.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1")) if s)


class Interrupted(Exception):
    """The run was stopped by a signal; the message says where and how to resume."""

    def __init__(self, message: str, signum: int, rank: int = 0):
        super().__init__(message)
        self.signum, self.rank = signum, rank
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: installs the handlers (main thread only) and restores the previous ones."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank, self.world_size, self.device = rank, world_size, device or torch.device("cpu")
        self.signum = 0                 # the first signal received (0: none)
        self.armed = False              # in the epoch loop: record, stop at a step boundary
        self.niter_per_ep, self.epochs = 1, 0
        self.last_ckpt: str | None = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:   # a forked data-loading worker inherited it: the trainer decides
            return
        if not self.armed:
            raise Interrupted(f"interrupted ({signal_name(signum)}) before training started; nothing was "
                              "trained: rerun the same command to start", signum, self.rank)
        if self.signum:   # the second one: stop now
            self._restore()
            self.armed = False
            raise Interrupted(f"interrupted again ({signal_name(signum)}): stopped at once; rerun the same command "
                              f"to resume from the last checkpoint ({self.last_ckpt or 'none yet'})", signum, self.rank)
        self.signum = signum
        log.warning("%s received: stopping after the current step%s (send it again to stop at once)",
                    signal_name(signum), "" if self.world_size == 1 else " once every rank knows")

    def arm(self, niter_per_ep: int, epochs: int) -> None:
        """From here on a signal stops the run at the next step boundary `check` is called at."""
        self.niter_per_ep, self.epochs, self.armed = max(1, niter_per_ep), epochs, True

    def _agreed(self) -> int:
        if self.world_size == 1:
            return self.signum
        from dino_fast.runtime.launch import named_collective
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)
        named_collective("all_reduce stop flag", dist.all_reduce, flag, op=dist.ReduceOp.MAX)
        return int(flag.item())   # at a logging window / after a checkpoint: a host sync already

    def check(self, it: int, last_ckpt: str | None, window: bool) -> None:
        """At a step boundary (`it` steps done): raise Interrupted when a signal came. One process
        decides at every step; several decide together at windows (`window`) only."""
        self.last_ckpt = last_ckpt
        if it >= self.niter_per_ep * self.epochs:   # training is over: let the run finish
            self.armed = False
            return
        if self.world_size > 1 and not window:
            return
        signum = self._agreed()
        if not signum:
            return
        self.armed = False
        done = it // self.niter_per_ep          # checkpoints are written at epoch ends
        redo = it - done * self.niter_per_ep
        where = (f"from {last_ckpt} ({done} epoch{'s' * (done != 1)} done"
                 + (f"; the {redo} step{'s' * (redo != 1)} after it are redone)" if redo else ", nothing lost)")
                 if last_ckpt else f"from the start (no checkpoint yet: the {it} steps are redone)")
        raise Interrupted(f"interrupted ({signal_name(signum)}) at step {it}; rerun the same command to "
                          f"resume {where}", signum, self.rank)
