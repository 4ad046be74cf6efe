"""Benchmark harness shared by `pytest bench/` and `dino-fast bench`.

CUDA-event timing with warm-up, peak extra memory, and the
standard fields every benchmark record carries (achieved GB/s or TFLOP/s,
fraction of the device's peak, ratio to the reference timed in the same run).
`run_case` times an op and its reference side by side after checking the
op's output against the reference's; the `bench_case` fixture of
bench/conftest.py and `dino-fast bench` both use it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # annotations only: dino_fast.devices times its bandwidth probe with this module
    from dino_fast.devices import DeviceSpec


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


def bench_autocast(device: torch.device):
    """The benches' precision: bf16 autocast on a GPU, plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def fwd_bwd_step(model: torch.nn.Module, inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    """A timed forward+backward of `model(inputs)` under `bench_autocast`
    (loss = mean square of the output); returns the detached fp32 output."""
    def run() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with bench_autocast(device):
            out = model(inputs)
        out.float().square().mean().backward()
        return out.detach().float()
    return run


def achieved_gbps(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes) of moving `nbytes` in `ms` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def achieved_tflops(flops: float, ms: float) -> float:
    """TFLOP/s of `flops` floating-point operations in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def record(ms: float, spec: DeviceSpec, *, nbytes: float | None = None, floor: str | None = None,
           flops: float | None = None, ref_ms: float | None = None, peak_mem: int | None = None, **extra) -> dict:
    """The standard fields of one benchmark record: ms; gbps, frac_hbm (of
    the HBM peak) and floor_ms (nbytes at the HBM peak) given the bytes moved,
    and `floor`, what those bytes count (e.g. "student 2R+1W, teacher 3R");
    tflops and mfu (of the bf16 peak) given the FLOPs; ref_ms and speedup
    (reference ms / ms) given the reference's time in the same run; peak
    extra memory."""
    if not ms > 0:
        raise ValueError(f"record: ms must be > 0, got {ms!r}")
    out: dict = {"device": spec.kind, "device_name": spec.name, "ms": ms}
    if nbytes is not None:
        gbps = achieved_gbps(nbytes, ms)
        out.update(gbps=gbps, frac_hbm=gbps / spec.hbm_gbps, floor_ms=nbytes / (spec.hbm_gbps * 1e9) * 1e3,
                   nbytes=nbytes)
        if floor is not None:
            out["floor"] = floor
    if flops is not None:
        tflops = achieved_tflops(flops, ms)
        out.update(tflops=tflops, mfu=tflops / spec.bf16_tflops)
    if ref_ms is not None:
        out.update(ref_ms=ref_ms, speedup=ref_ms / ms)
    if peak_mem is not None:
        out["peak_extra_mem_bytes"] = peak_mem
    out.update(extra)
    return out


# --------------------------------------------------------------------------- one case, op vs reference
@dataclass
class Case:
    """An op timed against its reference on the same inputs.

    fn / ref_fn: zero-argument callables, one step each (forward + backward
    where that is the hot path); their return values go to `check`.
    check(out, ref_out): raises AssertionError when the op is wrong.
    nbytes / flops: bytes moved or FLOPs per call of fn (for GB/s or TFLOP/s);
    floor: what nbytes counts (the traffic model's name).
    """
    name: str
    fn: Callable[[], object]
    ref_fn: Callable[[], object] | None = None
    check: Callable[[object, object], None] | None = None
    nbytes: float | None = None
    flops: float | None = None
    ref_name: str = "reference"
    extra: dict | None = None
    floor: str | None = None


def run_case(case: Case, spec: DeviceSpec, smoke: bool, warmup: int | None = None,
             iters: int | None = None, memory: bool = True) -> dict:
    """Check `case.fn` against `case.ref_fn` (always, smoke or not), then time
    both in this run and return the standard record (+ op, ref_name, smoke)."""
    device_type = "cuda" if spec.kind != "cpu" else "cpu"
    out = case.fn()
    if case.ref_fn is not None:
        ref_out = case.ref_fn()
        if case.check is not None:
            case.check(out, ref_out)
    elif case.check is not None:
        case.check(out, None)
    warmup = (1 if smoke else 3) if warmup is None else warmup
    iters = (2 if smoke else 20) if iters is None else iters
    ms = time_ms(case.fn, warmup, iters, device_type)
    ref_ms = time_ms(case.ref_fn, warmup, iters, device_type) if case.ref_fn is not None else None
    peak = peak_extra_memory(case.fn) if memory and device_type == "cuda" else None
    return record(ms, spec, nbytes=case.nbytes, floor=case.floor, flops=case.flops, ref_ms=ref_ms, peak_mem=peak,
                  op=case.name, ref_name=case.ref_name if case.ref_fn is not None else None,
                  smoke=smoke, **(case.extra or {}))
