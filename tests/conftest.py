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
