"""Benchmark harness shared by `pytest bench/` and `dino-fast bench`.

Device peaks, CUDA-event timing with warm-up, peak extra memory, and the
standard fields every benchmark record carries (achieved GB/s or TFLOP/s,
fraction of the device's peak, ratio to the reference timed in the same run).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """A device kind and its peak figures (dense bf16, HBM bandwidth)."""
    kind: str            # "h100", "h200", "a100", "cpu", or the CUDA name
    name: str            # full device name as reported
    hbm_gbps: float      # peak memory bandwidth, GB/s (1e9 bytes)
    bf16_tflops: float   # peak dense bf16 tensor throughput, TFLOP/s


# name substring -> (kind, GB/s, bf16 dense TFLOP/s); first match wins.
_PEAKS = (
    ("H200", ("h200", 4800.0, 989.0)),
    ("H100 PCIe", ("h100-pcie", 2000.0, 756.0)),
    ("H100", ("h100", 3350.0, 989.0)),
    ("A100", ("a100", 2039.0, 312.0)),
)


def device_spec(device: torch.device | str | None = None) -> DeviceSpec:
    """Peak figures of `device` (default: the current CUDA device, else CPU).
    Unknown GPUs get a measured bandwidth and a nominal 100 TFLOP/s."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return DeviceSpec("cpu", "cpu", measured_bandwidth_gbps(device), 1.0)
    name = torch.cuda.get_device_name(device)
    for key, (kind, gbps, tflops) in _PEAKS:
        if key in name:
            return DeviceSpec(kind, name, gbps, tflops)
    return DeviceSpec(name.lower().replace(" ", "-"), name, measured_bandwidth_gbps(device), 100.0)


def measured_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 26) -> float:
    """Copy bandwidth (read + write) of a large buffer, GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=2, iters=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10,
            device_type: str | None = None) -> float:
    """Median milliseconds of `fn()` after `warmup` calls: CUDA events on a
    GPU, perf_counter on the CPU."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    _sync(device_type)
    times = []
    for _ in range(iters):
        if device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_extra_memory(fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated by `fn()` above what was allocated before it
    (CUDA only; None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def record(ms: float, spec: DeviceSpec, *, nbytes: float | None = None, flops: float | None = None,
           ref_ms: float | None = None, peak_mem: int | None = None, **extra) -> dict:
    """The standard fields of one benchmark record."""
    out: dict = {"device": spec.kind, "device_name": spec.name, "ms": ms}
    if nbytes is not None:
        gbps = nbytes / (ms * 1e-3) / 1e9
        out.update(gbps=gbps, frac_hbm=gbps / spec.hbm_gbps)
    if flops is not None:
        tflops = flops / (ms * 1e-3) / 1e12
        out.update(tflops=tflops, mfu=tflops / spec.bf16_tflops)
    if ref_ms is not None:
        out.update(ref_ms=ref_ms, speedup=ref_ms / ms)
    if peak_mem is not None:
        out["peak_extra_mem_bytes"] = peak_mem
    out.update(extra)
    return out


def spec_dict(spec: DeviceSpec) -> dict:
    return asdict(spec)
