"""Peak figures of the devices dino-fast runs on: HBM bandwidth and dense bf16
tensor throughput, from the vendors' data sheets (no sparsity).

The benchmark harness divides achieved GB/s and TFLOP/s by these; the
training loop's MFU uses `bf16_peak_tflops`. A GPU not in the table gets a
measured copy bandwidth and a nominal 100 TFLOP/s; a CPU a nominal 1 TFLOP/s.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """A device kind and its peak figures (dense bf16, HBM bandwidth)."""
    kind: str            # "h100", "h200", "a100", "cpu", or the CUDA name
    name: str            # full device name as reported
    hbm_gbps: float      # peak memory bandwidth, GB/s (1e9 bytes)
    bf16_tflops: float   # peak dense bf16 tensor throughput, TFLOP/s


# name substring -> (kind, GB/s, bf16 dense TFLOP/s); first match wins, so the
# more specific names come first. Vendor data sheets (dense, no sparsity).
_PEAKS = (
    ("GH200", ("gh200", 4000.0, 989.0)),
    ("H200", ("h200", 4800.0, 989.0)),
    ("H100 PCIe", ("h100-pcie", 2000.0, 756.0)),
    ("H100 NVL", ("h100-nvl", 3900.0, 835.0)),
    ("H100", ("h100", 3350.0, 989.0)),
    ("A100-SXM4-40GB", ("a100-40gb", 1555.0, 312.0)),
    ("A100-PCIE-40GB", ("a100-40gb-pcie", 1555.0, 312.0)),
    ("A100 80GB PCIe", ("a100-pcie", 1935.0, 312.0)),
    ("A100", ("a100", 2039.0, 312.0)),
)
UNKNOWN_GPU_TFLOPS = 100.0   # nominal bf16 peak of a GPU not in the table (MFU is then indicative)
CPU_TFLOPS = 1.0             # nominal "peak" of a CPU (MFU on a CPU is indicative only)


def peaks_for_name(name: str) -> tuple[str, float, float] | None:
    """(kind, HBM GB/s, bf16 TFLOP/s) of a CUDA device name, None if unknown."""
    for key, peaks in _PEAKS:
        if key.lower() in name.lower():
            return peaks
    return None


def _resolve(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_peak_tflops(device: torch.device | str | None = None) -> float:
    """Dense bf16 peak TFLOP/s of `device` for MFU (table value; nominal for a CPU or an
    unknown GPU). Measures nothing."""
    device = _resolve(device)
    if device.type != "cuda":
        return CPU_TFLOPS
    known = peaks_for_name(torch.cuda.get_device_name(device))
    return known[2] if known is not None else UNKNOWN_GPU_TFLOPS


def device_spec(device: torch.device | str | None = None) -> DeviceSpec:
    """Peak figures of `device` (default: the current CUDA device, else CPU).
    Unknown GPUs get a measured bandwidth and a nominal 100 TFLOP/s."""
    device = _resolve(device)
    if device.type != "cuda":
        return DeviceSpec("cpu", "cpu", measured_bandwidth_gbps(device), CPU_TFLOPS)
    name = torch.cuda.get_device_name(device)
    known = peaks_for_name(name)
    if known is not None:
        return DeviceSpec(known[0], name, known[1], known[2])
    kind = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return DeviceSpec(kind, name, measured_bandwidth_gbps(device), UNKNOWN_GPU_TFLOPS)


def measured_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 26) -> float:
    """Copy bandwidth (read + write) of a large buffer, GB/s (timed by the bench harness)."""
    from dino_fast.benchmark.harness import time_ms
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=2, iters=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def spec_dict(spec: DeviceSpec) -> dict:
    return asdict(spec)
