"""pytest plugin of `dino-fast bench --gpu-check`: one JSON line per event, appended and
flushed as it happens, so a run killed at its time budget still leaves every outcome
it reached (and names the test it was in).

    python -m pytest -p dino_fast.gpu_check.plugin --gpu-check-events EVENTS.jsonl ...

Events (field "event"):
  collected   nodeid, file, gpu (has the `gpu` marker), needs_cuda (a skip / skipif mark
              whose reason says it needs CUDA or a GPU; null when none), device_module (the
              module's DEVICE follows CUDA)
  collect     a module that did not collect: nodeid, outcome (skipped | failed), reason
  start       nodeid (a test began)
  result      nodeid, outcome (passed | failed | skipped | xfailed | xpassed), phase,
              duration_s, reason (skip reason or the failure's last line), properties
              (record_property), bench (the bench record in benchmark.extra_info, if any)
  finish      exitstatus
"""
from __future__ import annotations

import json
import os
import re

import pytest

CUDA_REASON = re.compile(r"\bneeds?\b.*\b(cuda|gpu)\b", re.IGNORECASE)   # "needs a CUDA GPU"
DEVICE_LINE = re.compile(r"^DEVICE\s*=.*\bcuda\b.*torch\.cuda\.is_available\(\)", re.MULTILINE)


def pytest_addoption(parser):
    parser.getgroup("dino-fast gpu-check").addoption(
        "--gpu-check-events", default=None, help="append one JSON line per collected item / outcome to this file")


class _Events:
    def __init__(self, path: str):
        self._f = open(path, "a", encoding="utf-8")
        self._device_modules: dict[str, bool] = {}

    def emit(self, **event) -> None:
        self._f.write(json.dumps(event, default=str) + "\n")
        self._f.flush()

    def device_module(self, path) -> bool:
        key = str(path)
        if key not in self._device_modules:
            try:
                with open(key, encoding="utf-8") as f:
                    self._device_modules[key] = bool(DEVICE_LINE.search(f.read()))
            except OSError:
                self._device_modules[key] = False
        return self._device_modules[key]

    def close(self) -> None:
        self._f.close()


_EV: _Events | None = None      # this process's event file (collect reports carry no config)


def pytest_configure(config):
    global _EV
    path = config.getoption("--gpu-check-events")
    if path:
        _EV = _Events(path)


def pytest_unconfigure(config):
    global _EV
    if _EV is not None:
        _EV.close()
        _EV = None


def needs_cuda_reason(item) -> str | None:
    """The reason of a skip / skipif mark on `item` that says it needs CUDA or a GPU (whether or not
    its condition holds on this machine), else None."""
    for mark in item.iter_markers():
        if mark.name not in ("skip", "skipif"):
            continue
        reason = mark.kwargs.get("reason") or next((a for a in mark.args if isinstance(a, str)), "")
        if reason and CUDA_REASON.search(reason):
            return reason
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if _EV is None:
        return
    for it in items:
        _EV.emit(event="collected", nodeid=it.nodeid, file=os.path.relpath(str(it.path), str(config.rootpath)),
                 gpu=it.get_closest_marker("gpu") is not None, needs_cuda=needs_cuda_reason(it),
                 device_module=_EV.device_module(it.path))


def pytest_collectreport(report):
    if _EV is not None and report.outcome != "passed" and report.nodeid:
        _EV.emit(event="collect", nodeid=report.nodeid, outcome=report.outcome, reason=_reason(report))


def pytest_runtest_logstart(nodeid, location):
    if _EV is not None:
        _EV.emit(event="start", nodeid=nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if _EV is not None and call.when == "call" and report.passed:
        bm = getattr(item, "funcargs", {}).get("benchmark")
        rec = dict(getattr(bm, "extra_info", None) or {})
        if "ms" in rec and "device" in rec:
            report.user_properties.append(("_gpu_check_bench", rec))
    return report


def _reason(report) -> str:
    """A skip's reason, or the `E ` lines of a failure joined (500 characters at most)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        msg = str(report.longrepr[2])
        return msg[len("Skipped: "):] if msg.startswith("Skipped: ") else msg
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    err = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    return (" / ".join(e for e in err if e) if err else (lines[-1] if lines else ""))[:500]


def pytest_runtest_logreport(report):
    """The call's outcome, and a setup / teardown that did not pass (an error or a skip)."""
    if _EV is None or (report.when != "call" and report.passed):
        return
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    props = dict(report.user_properties)
    bench = props.pop("_gpu_check_bench", None)
    _EV.emit(event="result", nodeid=report.nodeid, outcome=outcome, phase=report.when,
             duration_s=round(report.duration, 4), reason="" if outcome == "passed" else _reason(report),
             properties=props, bench=bench)


def pytest_sessionfinish(session, exitstatus):
    if _EV is not None:
        _EV.emit(event="finish", exitstatus=int(exitstatus))
