"""`dino-fast bench --gpu-check [--dry-run]`: collect, plan, run the parts, write the results."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from dino_fast.benchmark.baseline import RESULTS_DIR, ROOT
from dino_fast.gpu_check.plan import DEFAULT_BUDGET_S, build_plan, collect, format_plan

SUMMARY_RESERVE_S = 15.0   # kept back from the parts: killing a timed-out part (<= 10 s), writing the results
log = logging.getLogger(__name__)


def _log_echo(text: str = "", end: str = "\n", file=None, flush: bool = False) -> None:
    """Where the check reports when no `echo` is given (the command passes print); progress
    lines (end="") are dropped."""
    if end == "":
        return
    (log.error if file is sys.stderr else log.info)("%s", text.strip("\r"))


def _missing_test_tools() -> list[str]:
    import importlib.util
    return [name for name, mod in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark"))
            if importlib.util.find_spec(mod) is None]


def plan_now(budget_s: float, root: str, t0: float):
    """Collect tests/ and bench/ and sort them into the parts; the parts get what is left of
    `budget_s` (counted from the time.monotonic() value t0) less SUMMARY_RESERVE_S."""
    items, skips = collect(root, timeout_s=min(budget_s, 120.0))
    left = budget_s - (time.monotonic() - t0) - SUMMARY_RESERVE_S
    return build_plan(items, skips, max(left, 0.0))


def dry_run(budget_s: float = DEFAULT_BUDGET_S, as_json: bool = False, root: str | None = None,
            echo=_log_echo) -> int:
    """Print what the check would run (collects, runs nothing); the parts' budgets are their
    shares of `budget_s` (on the GPU, collection time comes off them)."""
    items, skips = collect(root or ROOT, timeout_s=120.0)
    plan = build_plan(items, skips, budget_s)
    echo(json.dumps(plan.to_dict(), indent=1) if as_json else format_plan(plan))
    return 0


def run_check(budget_s: float = DEFAULT_BUDGET_S, results_dir: str = RESULTS_DIR,
              workdir: str = os.path.join("output", "gpu-check"), root: str | None = None,
              echo=_log_echo) -> int:
    """The whole check on the first CUDA device; 0 when every part passed, 1 otherwise."""
    import torch

    from dino_fast.devices import device_spec
    from dino_fast.gpu_check.runner import run_plan
    from dino_fast.gpu_check.summary import build_report, optional_packages, write_results
    if not torch.cuda.is_available():
        echo("dino-fast bench --gpu-check: no CUDA device visible (torch.cuda.is_available() is False); "
              "on a machine without a GPU use --gpu-check --dry-run to list what it would run", file=sys.stderr)
        return 2
    missing = _missing_test_tools()
    if missing:
        echo(f"dino-fast bench --gpu-check: {', '.join(missing)} not installed; it installs nothing itself: "
              f"pip install {' '.join(missing)} (or carry the wheels in), then rerun", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    spec = device_spec(torch.device("cuda"))
    optional = optional_packages()
    echo(f"dino-fast bench --gpu-check on {spec.name} ({spec.kind}), {budget_s:.0f} s budget; "
          f"xformers {optional.get('xformers') or 'not installed'}, "
          f"DALI {optional.get('nvidia.dali') or 'not installed'}", flush=True)
    root = root or ROOT
    plan = plan_now(budget_s, root, t0)
    workdir = os.path.abspath(workdir)

    def on_start(part, limit):
        echo(f"[{part.name}] {part.what}: {len(part.nodeids)} item(s), up to {limit:.0f} s", flush=True)

    def progress(part, done, total):
        echo(f"\r[{part.name}] {done}/{total} done, {time.monotonic() - t0:.0f} s elapsed", end="", flush=True)

    def on_end(p):
        counts = ", ".join(f"{n} {k}" for k, n in sorted(p.counts().items()))
        line = (f"[{p.name}] {p.status.upper() if p.status in ('failed', 'timed out') else p.status} in "
                f"{p.seconds:.0f} s: {counts}" + (f" ({p.note})" if p.note else ""))
        echo("\r" + line.ljust(72), flush=True)

    parts = run_plan(plan, workdir, root, on_start=on_start, on_end=on_end, progress=progress)
    section, cases = build_report(parts, plan, time.monotonic() - t0, optional, budget_s)
    json_path, md_path = write_results(results_dir, spec.kind, spec.name, section, cases)
    echo(f"wrote {json_path} and {md_path}; logs in {workdir}\n"
          f"commit them, then run python tools/bench_table.py to fill the README's table")
    return 0 if all(p.status in ("passed", "empty") for p in parts) else 1
