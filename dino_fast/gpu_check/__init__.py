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
from dino_fast.gpu_check.check import dry_run, run_check

__all__ = ["dry_run", "run_check"]
