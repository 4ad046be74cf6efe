"""`data_time_frac` counts the time a step waited for its data, not the GPU compute of
the step (dino_fast/train/data_wait.py; the DALI backend's host-to-GPU copies).

CPU: host timestamps around next(), the step's own time excluded. CUDA: the wait is
measured on the device, so a loader that blocks the host while the GPU still computes
counts nothing, and one that leaves the GPU idle counts that idle time. DALI on CUDA:
fetching a batch does not wait for the work queued on the compute stream. The sleeps
are generous (0.1-0.2 s) and the bounds one-sided where the machine's load could shift
them."""
from __future__ import annotations

import time

import pytest
import torch

from dino_fast.train.data_wait import DataWait
from tests.conftest import requires_cuda


def _slow_loader(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)          # the loader holds the host
        yield i


def test_cpu_counts_the_loader_not_the_step():
    timed = DataWait(_slow_loader(3, 0.1), torch.device("cpu"))
    waits = []
    for batch, waited in timed:
        waits.append(waited)
        time.sleep(0.4)              # the step: must not count
    assert len(waits) == 3
    assert all(0.1 <= w < 0.35 for w in waits), waits
    assert timed.take() == 0.0


def _gpu_sleep(seconds: float) -> None:
    """Queue ~`seconds` of GPU work on the current stream (torch.cuda._sleep spins cycles)."""
    hz = torch.cuda.get_device_properties(0).clock_rate * 1e3 if hasattr(
        torch.cuda.get_device_properties(0), "clock_rate") else 1.5e9
    torch.cuda._sleep(int(seconds * hz))


@requires_cuda
def test_cuda_busy_gpu_is_not_data_time():
    """The loader blocks the host for 0.1 s while the GPU still runs 0.3 s of the step:
    the GPU never waited, so no data time (a host timer would report 0.1 s per step)."""
    timed = DataWait(_slow_loader(4, 0.1), torch.device("cuda"))
    host = []
    for _, waited in timed:
        host.append(waited)
        _gpu_sleep(0.3)
    torch.cuda.synchronize()
    assert timed.take() < 0.05 * 3                     # 3 device-timed waits (the first is host-timed)
    assert host[0] >= 0.1 and host[1:] == [0.0, 0.0, 0.0]


@requires_cuda
def test_cuda_idle_gpu_waiting_for_data_is_data_time():
    """A short step and a loader holding the host 0.2 s: the GPU idles ~0.2 s per batch."""
    timed = DataWait(_slow_loader(4, 0.2), torch.device("cuda"))
    for _ in timed:
        _gpu_sleep(0.01)
    torch.cuda.synchronize()
    assert 3 * 0.15 <= timed.take() <= 3 * 0.4


@requires_cuda
@pytest.mark.skipif(__import__("importlib").util.find_spec("nvidia") is None
                    or __import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_dali_batch_does_not_wait_for_the_compute_stream(tmp_path):
    """With 1 s of work queued on the compute stream, the next DALI batch (crops and labels on
    the GPU) arrives while that work still runs: the loader never synchronises the step."""
    from dino_fast.pipelines import MultiCropLoader
    from tests.test_pipeline_sources import SMALL, write_photos
    paths = write_photos(tmp_path, 8, size=96)
    loader = MultiCropLoader(paths, batch_size=4, backend="dali", device="cuda", seed=0,
                             dtype=torch.float32, num_workers=2, **SMALL)
    it = iter(loader)
    next(it)                                           # pipeline built and warm
    torch.cuda.synchronize()
    _gpu_sleep(1.0)
    crops, labels = next(it)
    assert not torch.cuda.current_stream().query(), "the loader waited for the compute stream"
    torch.cuda.synchronize()
    assert labels.device.type == "cuda" and all(c.device.type == "cuda" for c in crops)
