"""Shared fixtures and the baseline machinery of `pytest bench/`.

Without a GPU the suite runs in smoke mode: tiny shapes, still asserting the
correctness of what it times (run it with --benchmark-disable in CI).

Every test that fills `benchmark.extra_info` with a `record(...)` (fields
`device` and `ms`) is a case: its record is kept under its node id, shown in
the summary table, compared with the committed baseline of the same device
kind (`--compare-baseline [--baseline-tolerance 0.10]`: a case more than the
tolerance slower fails) and written with `--save-baseline` to
bench/results/<device>.json. The `bench_case` fixture does the usual case in
one call: check against the reference, time both, fill extra_info.
"""
from tests.conftest import HAS_CUDA  # noqa: E402,F401  (sets TRITON_INTERPRET first)

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dino_fast.benchmark import baseline as bench_baseline  # noqa: E402
from dino_fast.benchmark.harness import Case, run_case  # noqa: E402
from dino_fast.devices import device_spec  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("dino-fast bench baselines")
    group.addoption("--compare-baseline", action="store_true",
                    help="fail a case more than --baseline-tolerance slower than the committed "
                         "baseline of the same device kind (bench/results/<device>.json)")
    group.addoption("--baseline-tolerance", type=float, default=bench_baseline.DEFAULT_TOLERANCE,
                    help="allowed slowdown as a fraction (default 0.10)")
    group.addoption("--save-baseline", action="store_true",
                    help="write this run's cases to bench/results/<device>.json (merged, atomic)")
    group.addoption("--baseline-dir", default=bench_baseline.RESULTS_DIR,
                    help="where baselines live (default bench/results)")
    group.addoption("--bench-manifest", default=None,
                    help="write the collected bench cases and whether each would be skipped (JSON)")


class _State:
    def __init__(self, config):
        self.compare = config.getoption("--compare-baseline")
        self.tolerance = config.getoption("--baseline-tolerance")
        self.save = config.getoption("--save-baseline")
        self.dir = config.getoption("--baseline-dir")
        self.results: dict[str, dict] = {}
        self.comparisons: dict[str, bench_baseline.Comparison] = {}
        self._baselines: dict[str, dict | None] = {}

    def baseline(self, kind: str) -> dict | None:
        if kind not in self._baselines:
            self._baselines[kind] = bench_baseline.load(bench_baseline.results_path(self.dir, kind))
        return self._baselines[kind]


_STATE_KEY = pytest.StashKey[_State]()


def pytest_configure(config):
    if config.getoption("--baseline-tolerance") < 0:
        raise pytest.UsageError("--baseline-tolerance must be >= 0 (a fraction, e.g. 0.10)")
    config.stash[_STATE_KEY] = _State(config)


def _case_name(item) -> str:
    return bench_baseline.case_name(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield          # the test passed (a failing test re-raises above)
    state = item.config.stash.get(_STATE_KEY, None)
    bm = getattr(item, "funcargs", {}).get("benchmark")
    rec = dict(getattr(bm, "extra_info", None) or {})
    if state is None or "ms" not in rec or "device" not in rec:
        return result
    name = _case_name(item)
    state.results[name] = rec
    if state.compare:
        cmp = bench_baseline.compare_case(name, rec, state.baseline(rec["device"]), state.tolerance)
        state.comparisons[name] = cmp
        if cmp.status == "slower":
            pytest.fail(bench_baseline.regression_message(
                cmp, state.tolerance, bench_baseline.results_path(state.dir, rec["device"])), pytrace=False)
    return result


def _would_skip(item) -> bool:
    for mark in item.iter_markers():
        if mark.name == "skip":
            return True
        if mark.name == "skipif" and mark.args and all(bool(a) for a in mark.args if not isinstance(a, str)):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--bench-manifest")
    if not path:
        return
    manifest = [{"nodeid": it.nodeid, "file": os.path.basename(str(it.path)), "skipped": _would_skip(it)}
                for it in items if "bench" in str(it.path)]
    bench_baseline.write_json_atomic(path, manifest)


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_STATE_KEY, None)
    if state is None or not state.save or not state.results:
        return
    by_device: dict[str, dict] = {}
    for name, rec in state.results.items():
        by_device.setdefault(rec["device"], {})[name] = rec
    for kind, cases in by_device.items():
        first = next(iter(cases.values()))
        path = bench_baseline.results_path(state.dir, kind)
        bench_baseline.save(path, kind, first.get("device_name", kind), cases, bool(first.get("smoke")))
        state.saved = getattr(state, "saved", []) + [path]


def _fmt(v, spec="{:.3g}") -> str:
    return "-" if v is None else spec.format(v)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE_KEY, None)
    if state is None or not state.results:
        return
    tr = terminalreporter
    tr.section("dino-fast bench")
    tr.write_line(f"{'case':<58} {'ms':>9} {'ref ms':>9} {'x ref':>6} {'GB/s|TF/s':>10} {'% peak':>7}  baseline")
    for name, rec in state.results.items():
        rate, frac = (rec.get("gbps"), rec.get("frac_hbm")) if "gbps" in rec else (rec.get("tflops"), rec.get("mfu"))
        cmp = state.comparisons.get(name)
        base = "-" if cmp is None else (cmp.status if cmp.ratio is None else f"{cmp.status} ({cmp.ratio:.2f}x)")
        tr.write_line(f"{name[:58]:<58} {_fmt(rec['ms']):>9} {_fmt(rec.get('ref_ms')):>9} "
                      f"{_fmt(rec.get('speedup'), '{:.2f}'):>6} {_fmt(rate):>10} "
                      f"{_fmt(None if frac is None else 100 * frac, '{:.1f}'):>7}  {base}")
    notes = sorted({c.note for c in state.comparisons.values() if c.status == "not-compared" and c.note})
    for note in notes:
        tr.write_line(f"baseline: {note}")
    if any(r.get("smoke") for r in state.results.values()):
        tr.write_line("smoke mode (no GPU): tiny shapes, correctness asserted, timings not meaningful")
    for path in getattr(state, "saved", []):
        tr.write_line(f"baseline written: {path}")


# --------------------------------------------------------------------------- fixtures
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


@pytest.fixture
def bench_case(benchmark, spec, smoke):
    """bench_case(name, fn, ref_fn=None, *, check=None, nbytes=None, floor=None, flops=None,
    ref_name="reference", **extra) -> record: checks fn's output against
    ref_fn's with `check(out, ref_out)`, times both (CUDA events), fills
    benchmark.extra_info with the standard record, and runs pytest-benchmark
    on fn (one round when smoke / --benchmark-disable)."""
    def run(name, fn, ref_fn=None, *, check=None, nbytes=None, floor=None, flops=None, ref_name="reference",
            **extra):
        rec = run_case(Case(name, fn, ref_fn, check, nbytes, flops, ref_name, extra, floor), spec, smoke)
        benchmark.extra_info.update(rec)
        benchmark.pedantic(fn, rounds=1 if smoke else 10, iterations=1, warmup_rounds=0 if smoke else 1)
        return rec
    return run


def pytest_report_header(config):
    return (f"dino-fast bench: {'GPU' if torch.cuda.is_available() else 'CPU smoke mode'}; "
            f"baselines in {config.getoption('--baseline-dir')}")

