"""Shared fixtures for `pytest bench/`.

Without a GPU the suite runs in smoke mode: tiny shapes, still asserting the
correctness of what it times (run it with --benchmark-disable in CI).
"""
from tests.conftest import HAS_CUDA  # noqa: E402,F401  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402

from dino_fast.benchmark import device_spec  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smoke() -> bool:
    """True where the suite runs at tiny shapes (no GPU)."""
    return not torch.cuda.is_available()


@pytest.fixture(scope="session")
def spec(device):
    return device_spec(device)
