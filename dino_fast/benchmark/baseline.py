"""Benchmark baselines: one JSON per device kind under bench/results/.

    bench/results/<kind>.json = {"schema": 1, "device": "h100", "device_name": ...,
        "date": ..., "commit": ..., "versions": {...}, "smoke": false,
        "cases": {"test_ema.py::test_ema[fp32]": {"ms": ..., "ref_ms": ..., ...}, ...}}

`pytest bench/ --save-baseline` writes it (merging into the file of the same
device kind, atomically); `--compare-baseline` compares each case's `ms`
with the committed number of the SAME device kind and fails a case that is
more than the tolerance slower. Results of another device kind, or smoke
(CPU, tiny shapes) results, are never compared.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass

SCHEMA = 1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
DEFAULT_TOLERANCE = 0.10


def git_commit(cwd: str | None = None) -> str:
    cwd = cwd or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment() -> dict:
    """Date, commit and the versions that decide the numbers."""
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    from dino_fast import __version__
    versions["dino_fast"] = __version__
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "versions": versions}


def case_name(nodeid: str) -> str:
    """A bench case's name in the baseline: its node id below bench/."""
    return nodeid.split("bench/", 1)[-1]


def results_path(results_dir: str, device_kind: str) -> str:
    return os.path.join(results_dir, f"{device_kind}.json")


def write_json_atomic(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(value):
    if hasattr(value, "item"):          # 0-dim tensors / numpy scalars
        return value.item()
    return str(value)


def load(path: str) -> dict | None:
    """The baseline at `path`, None when there is none; a clear error when it is unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix it or delete it and rerun "
                         f"`pytest bench/ --save-baseline`") from exc
    if not isinstance(data, dict) or "cases" not in data or "device" not in data:
        raise ValueError(f"{path}: not a dino-fast baseline (needs 'device' and 'cases'); "
                         f"regenerate it with `pytest bench/ --save-baseline`")
    return data


def save(path: str, device_kind: str, device_name: str, cases: dict[str, dict], smoke: bool) -> dict:
    """Merge `cases` into the baseline at `path` (same device kind and mode:
    the other cases are kept; otherwise the file is replaced) and write it
    atomically. Returns what was written."""
    old = None
    try:
        old = load(path)
    except ValueError:
        old = None
    kept = {}
    if old and old.get("device") == device_kind and bool(old.get("smoke")) == bool(smoke):
        kept = dict(old["cases"])
    kept.update(cases)
    data = {"schema": SCHEMA, "device": device_kind, "device_name": device_name, "smoke": bool(smoke),
            **environment(), "cases": kept}
    write_json_atomic(path, data)
    return data


@dataclass
class Comparison:
    """One case against the committed baseline."""
    name: str
    status: str                   # ok | slower | faster | new | not-compared
    ms: float
    base_ms: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ms / self.base_ms if self.base_ms else None


def compare_case(name: str, rec: dict, baseline: dict | None, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """`rec` (a record with device, ms, smoke) against `baseline` (a loaded file)."""
    ms = float(rec["ms"])
    if rec.get("smoke"):
        return Comparison(name, "not-compared", ms, note="smoke mode (tiny shapes): timings are not compared")
    if baseline is None:
        return Comparison(name, "not-compared", ms,
                          note=f"no committed baseline for device {rec['device']!r}")
    if baseline.get("device") != rec["device"]:
        return Comparison(name, "not-compared", ms,
                          note=f"baseline is for {baseline.get('device')!r}, this run is on "
                               f"{rec['device']!r}: different devices are never compared")
    if baseline.get("smoke"):
        return Comparison(name, "not-compared", ms, note="the baseline holds smoke results")
    base = baseline["cases"].get(name)
    if not base or not base.get("ms"):
        return Comparison(name, "new", ms, note="no baseline for this case yet")
    base_ms = float(base["ms"])
    note = ""
    if baseline.get("device_name") and rec.get("device_name") and baseline["device_name"] != rec["device_name"]:
        note = f"baseline device {baseline['device_name']!r}, this run {rec['device_name']!r}"
    if ms > base_ms * (1 + tolerance):
        status = "slower"
    elif ms < base_ms * (1 - tolerance):
        status = "faster"
    else:
        status = "ok"
    return Comparison(name, status, ms, base_ms, note)


def regression_message(c: Comparison, tolerance: float, baseline_path: str) -> str:
    return (f"{c.name}: {c.ms:.4g} ms is {100 * (c.ratio - 1):.1f}% slower than the baseline "
            f"{c.base_ms:.4g} ms in {baseline_path} (tolerance {100 * tolerance:.0f}%)"
            + (f"; {c.note}" if c.note else ""))


def save_record(name: str, key: str, rec: dict, results_dir: str = RESULTS_DIR) -> str:
    """Merge `rec` under `key` into <results_dir>/<name>_<device>.json (atomic):
    the per-op detail files some benches keep beside the baseline."""
    path = os.path.join(results_dir, f"{name}_{rec['device']}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data[key] = rec
    write_json_atomic(path, data)
    return path
