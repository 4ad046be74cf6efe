"""The pytest header says which optional backends are present and so which GPU tests
run (tests/conftest.py `pytest_report_header`)."""
import importlib.util

from dino_fast.model.attention import has_varlen, has_xformers
from tests.conftest import HAS_CUDA, backend_report, optional_backends


def test_header_lists_backends_as_found():
    rows = {n: ok for n, ok, _ in optional_backends()}
    assert rows == {"CUDA": HAS_CUDA, "xformers": has_xformers(), "flash varlen": has_varlen(),
                    "DALI": importlib.util.find_spec("nvidia") is not None
                    and importlib.util.find_spec("nvidia.dali") is not None}


def test_header_says_what_runs_and_why_not():
    rows = [("CUDA", True, "cuda tests"), ("xformers", True, "xformers vs math"),
            ("flash varlen", False, "flash vs math"), ("DALI", True, "dali")]
    assert backend_report(rows, cuda=True) == [
        "optional backends: CUDA yes, xformers yes, flash varlen no, DALI yes",
        "  runs: cuda tests", "  runs: xformers vs math", "  skips: flash vs math (flash varlen not installed)",
        "  runs: dali"]
    no_gpu = backend_report([("CUDA", False, "cuda tests"), ("xformers", True, "xformers vs math")], cuda=False)
    assert no_gpu[1:] == ["  skips: cuda tests (no CUDA GPU)", "  skips: xformers vs math (no CUDA GPU)"]
