"""How long each step waited for its data: the loop's `data_time_frac`.

The training step never synchronises the host, so on a GPU the host runs ahead of the
device: a host timestamp around `next(loader)` also counts whatever the loader blocks
on, including the GPU compute of the previous step (any copy or wait that is ordered
on the compute stream), and a wait the GPU never noticed (it still had queued work).
On CUDA the wait is therefore measured on the device, with two events per step on the
compute stream: one recorded when the previous step's work is all queued (just before
`next`), one when the batch is ready (just after). The GPU reaches the second event
right after the first when it was still busy (no data wait), and later by exactly the
time it sat idle for the data when the loader (DALI blocked waiting for its pipeline,
workers too slow) held the host. Events are read at the logging step, after its host
sync, so the step stays sync-free. The first batch of an epoch, and every batch on the
CPU, is timed on the host.
"""
from __future__ import annotations

import time

import torch


class DataWait:
    """Iterate `loader` as (batch, seconds waited on the host or 0.0); `take()` adds up the
    device-side waits since the last call (0.0 on the CPU)."""

    def __init__(self, loader, device: torch.device | None = None):
        self.loader = loader
        device = device if device is not None else getattr(loader, "device", torch.device("cpu"))
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __iter__(self):
        it = iter(self.loader)
        first = True
        while True:
            queued = self._event() if self.cuda and not first else None   # previous step all queued
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            waited = time.perf_counter() - t0
            if queued is not None:
                self._pending.append((queued, self._event()))
                waited = 0.0                        # measured on the device instead: take()
            first = False
            yield batch, waited

    @staticmethod
    def _event() -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def take(self) -> float:
        """Seconds the device sat idle waiting for data since the last call (pairs whose
        events the device has not reached yet stay for the next call; no host sync)."""
        total, keep = 0.0, []
        for queued, ready in self._pending:
            if ready.query():
                total += queued.elapsed_time(ready) / 1e3
            else:
                keep.append((queued, ready))
        self._pending = keep
        return total


__all__ = ["DataWait"]
