"""Run the plan's parts, each a pytest process with the gpu-check plugin and a hard time
limit (its share of the budget plus what the parts before it left unused). A part that
runs out of time is killed and reported as timed out: the tests it finished keep their
outcomes, the one it was in is `timed out`, the ones it never reached are `not run`."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from dino_fast.benchmark.baseline import ROOT
from dino_fast.gpu_check.plan import Part, Plan, pytest_command, read_events

MIN_PART_S = 5.0          # a part with less time left than this is not started
POLL_S = 0.5

# outcome precedence when a test reports more than once (call, then a failing teardown)
_RANK = {"failed": 5, "xpassed": 4, "passed": 3, "xfailed": 2, "skipped": 1}


@dataclass
class PartResult:
    name: str
    what: str
    status: str                 # passed | failed | timed out | not run | empty
    budget_s: float             # the time it was given (share + rollover, capped by what was left)
    seconds: float
    exit_code: int | None
    log: str | None
    tests: list[dict] = field(default_factory=list)   # nodeid, outcome, reason, duration_s, properties, bench
    note: str = ""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tests:
            out[t["outcome"]] = out.get(t["outcome"], 0) + 1
        return out


def outcomes(nodeids: list[str], events: list[dict], finished: bool, limit_s: float | None = None) -> list[dict]:
    """One entry per planned node id from the plugin's events: the reported outcome; for a
    run that was cut short, `timed out` for the test it was in and `not run` for the rest."""
    results: dict[str, dict] = {}
    started: list[str] = []
    for e in events:
        if e["event"] == "start":
            started.append(e["nodeid"])
        elif e["event"] == "result":
            old = results.get(e["nodeid"])
            if old is None or _RANK.get(e["outcome"], 0) > _RANK.get(old["outcome"], 0):
                merged = dict(e)
                if old is not None:     # keep the call's properties and bench record
                    merged["properties"] = {**old.get("properties", {}), **e.get("properties", {})}
                    merged["bench"] = e.get("bench") or old.get("bench")
                results[e["nodeid"]] = merged
    in_flight = started[-1] if started and started[-1] not in results else None
    out = []
    for n in nodeids:
        if n in results:
            r = results[n]
            out.append({"nodeid": n, "outcome": r["outcome"], "reason": r.get("reason", ""),
                        "duration_s": r.get("duration_s"), "properties": r.get("properties") or {},
                        "bench": r.get("bench")})
        elif n == in_flight and not finished:
            why = f"the part ran out of time ({limit_s:.0f} s) in this test" if limit_s else "the part was killed"
            out.append({"nodeid": n, "outcome": "timed out", "reason": why, "duration_s": None,
                        "properties": {}, "bench": None})
        else:
            why = ("the part ran out of time before this test" if not finished
                   else "not reported by pytest (deselected or not collected in this run)")
            out.append({"nodeid": n, "outcome": "not run", "reason": why, "duration_s": None,
                        "properties": {}, "bench": None})
    return out


def _kill(proc: subprocess.Popen) -> None:
    """End the part's pytest process group (started by us with start_new_session)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, limit_s: float, workdir: str, root: str = ROOT, progress=None) -> PartResult:
    """Run `part` under a hard limit of `limit_s` seconds; `progress(done, total)` is called
    as tests finish."""
    if not part.nodeids:
        return PartResult(part.name, part.what, "empty", limit_s, 0.0, None, None, note="nothing to run")
    if limit_s < MIN_PART_S:
        res = PartResult(part.name, part.what, "not run", limit_s, 0.0, None, None,
                         note="the time budget was spent before this part")
        res.tests = outcomes(part.nodeids, [], finished=False)
        for t in res.tests:
            t["reason"] = "the time budget was spent before this part"
        return res
    os.makedirs(workdir, exist_ok=True)
    events_path = os.path.join(workdir, f"{part.name}.jsonl")
    log_path = os.path.join(workdir, f"{part.name}.log")
    for p in (events_path,):
        if os.path.exists(p):
            os.remove(p)
    cmd = pytest_command([*part.pytest_args, "-q", *part.nodeids], events_path)
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if progress is not None:
                        done = sum(1 for e in read_events(events_path)
                                   if e["event"] == "result" and e["phase"] != "teardown")
                        progress(done, len(part.nodeids))
                    if time.monotonic() - t0 > limit_s:
                        timed_out = True
                        _kill(proc)
                        break
        except BaseException:
            _kill(proc)
            raise
    seconds = time.monotonic() - t0
    events = read_events(events_path)
    finished = not timed_out and any(e["event"] == "finish" for e in events)
    tests = outcomes(part.nodeids, events, finished, limit_s)
    if timed_out:
        status = "timed out"
    elif any(t["outcome"] in ("failed", "xpassed") for t in tests) or proc.returncode not in (0, 5):
        status = "failed"
    else:
        status = "passed"
    note = ""
    if not timed_out and not finished:
        note = f"pytest exited {proc.returncode} without finishing; see {log_path}"
    return PartResult(part.name, part.what, status, limit_s, round(seconds, 1),
                      None if timed_out else proc.returncode, log_path, tests, note)


def run_plan(plan: Plan, workdir: str, root: str = ROOT, on_start=None, on_end=None, progress=None,
             budget_start: float | None = None) -> list[PartResult]:
    """Every part in order. Each gets its share plus the unused time of the parts before,
    never more than what is left of plan.budget_s (counted from `budget_start`, a
    time.monotonic() value; default now)."""
    start = time.monotonic() if budget_start is None else budget_start
    results, planned = [], 0.0
    for part in plan.parts:
        planned += part.budget_s
        left = plan.budget_s - (time.monotonic() - start)
        limit = max(0.0, min(planned - (time.monotonic() - start), left))
        if on_start is not None and part.nodeids:
            on_start(part, limit)
        results.append(run_part(part, limit, workdir, root,
                                None if progress is None else (lambda d, t, _p=part: progress(_p, d, t))))
        if on_end is not None and part.nodeids:
            on_end(results[-1])
    return results
