"""Test-wide setup.

Without a GPU every Triton kernel runs under the Triton interpreter: the
variable must be set before triton is first imported, which happens lazily
inside dino_fast, so setting it here (conftest is imported first) is enough.
"""
import os
import shutil
import subprocess


def _has_cuda_gpu() -> bool:
    # Decide without importing torch.cuda state into the main process too early.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _has_cuda_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
_skip_without_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def requires_cuda(test):
    """A GPU-only test: skipped without CUDA, marked `gpu` (dino-fast bench --gpu-check runs it)."""
    return pytest.mark.gpu(_skip_without_cuda(test))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def optional_backends() -> list[tuple[str, bool, str]]:
    """(backend, present, the GPU tests that run only with it) for the report header."""
    import importlib.util

    from dino_fast.model.attention import has_varlen, has_xformers
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    return [("CUDA", HAS_CUDA, "every CUDA test: Triton on CUDA, memory plan vs peak, CUDA timings"),
            ("xformers", has_xformers(), "xformers attention vs math (with CUDA)"),
            ("flash varlen", has_varlen(), "flash varlen attention vs math (with CUDA)"),
            ("DALI", dali, "DALI pipelines (CPU graph here; mixed decode with CUDA)")]


def backend_report(rows, cuda: bool) -> list[str]:
    """Header lines for `optional_backends()` rows: what is present, what runs, what skips and why."""
    lines = ["optional backends: " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok, _ in rows)]
    for n, ok, what in rows:
        runs = ok and (cuda or n == "DALI")
        why = "" if runs else (f" ({n} not installed)" if not ok and n != "CUDA" else " (no CUDA GPU)")
        lines.append(f"  {'runs' if runs else 'skips'}: {what}{why}")
    return lines


def pytest_report_header(config):
    """Which optional backends are present, so which GPU tests run and which skip."""
    return backend_report(optional_backends(), HAS_CUDA)
