"""`dino-fast bench --gpu-check`: everything a first GPU session should measure, in one
command and a fixed time budget (8 minutes on one H100 / H200 by default).

plan.py     collect tests/ and bench/, sort the GPU tests and the benches into parts
plugin.py   the pytest plugin that records each outcome as it happens (JSON lines)
runner.py   run each part as a pytest process under a hard time limit
summary.py  bench/results/<device>.json ("gpu_check" section + the benches' cases) and <device>.md
check.py    the command: --dry-run (list) or the run

The GPU tests are the tests/ items with the `gpu` marker (registered in pytest.ini): those
that skip without CUDA, and the kernel test modules whose DEVICE follows CUDA.
"""
__all__ = ["dry_run", "run_check"]


def __getattr__(name):
    # lazy: the pytest plugin (plugin.py) loads this package in every part's process and
    # must not pull in torch through check.py
    if name in __all__:
        from dino_fast.gpu_check import check
        return getattr(check, name)
    raise AttributeError(f"module 'dino_fast.gpu_check' has no attribute {name!r}")
