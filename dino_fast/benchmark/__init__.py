"""The benchmark harness (the suites are in bench/).

harness.py   timing (CUDA events), peak extra memory, the standard record, Case / run_case
cases.py     the key cases `dino-fast bench` runs, and the bytes-moved formula of each op
baseline.py  per-device baselines under bench/results/ (save, compare, per-op records)
table.py     the README's performance tables from the committed results (tools/bench_table.py)

Device peak figures are in dino_fast.devices. The harness's names are
importable from here: `from dino_fast.benchmark import record, time_ms`.
"""
from dino_fast.benchmark.harness import (Case, achieved_gbps, achieved_tflops, bench_autocast, fwd_bwd_step,
                                         peak_extra_memory, record, run_case, time_ms)

__all__ = ["Case", "achieved_gbps", "achieved_tflops", "bench_autocast", "fwd_bwd_step", "peak_extra_memory",
           "record", "run_case", "time_ms"]
