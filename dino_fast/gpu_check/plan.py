"""What `dino-fast bench --gpu-check` runs: the GPU tests in parts, then the benches, each
part with its share of the time budget (8 minutes on one H100 / H200 by default).

The GPU tests are found by collecting tests/ (pytest, with the gpu-check plugin): every
item with the `gpu` marker, plus any item whose skip reason names CUDA or a GPU but
lacks the marker (run all the same, and listed as unmarked so it gets one). The benches
are every item collected under bench/, run with --save-baseline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from dino_fast.benchmark.baseline import ROOT

DEFAULT_BUDGET_S = 480.0
COLLECT_TIMEOUT_S = 120.0


class GpuCheckError(RuntimeError):
    """The check cannot start (no checkout to collect, collection failed): a one-line message."""


@dataclass(frozen=True)
class PartSpec:
    """One part: a name, what it proves, its share of the budget, the tests it takes."""
    name: str
    what: str
    share: float
    files: tuple[str, ...] = ()     # test files whose GPU-only tests belong here ("" suffix match)


# in run order; GPU-only tests go to the first part listing their file, the rest to "other";
# "kernel_suites" takes the gpu-marked tests that also run on the CPU (DEVICE follows CUDA);
# "benches" is every bench under bench/.
PARTS = (
    PartSpec("triton", "Triton kernels on CUDA against the torch references",
             0.11, ("test_dino_loss.py", "test_ema.py", "test_softmax_ce.py", "test_softmax_teacher.py",
                    "test_sinkhorn_knopp.py", "test_ibot_patch_loss.py", "test_dino_clstoken_loss.py",
                    "test_koleo_loss.py", "test_kernels_aot.py")),
    PartSpec("attention", "packed attention backends (xformers, flash, flex, sdpa) against math",
             0.08, ("test_attention.py",)),
    PartSpec("dali", "DALI 'mixed' (nvJPEG) decode + GPU ops against the CPU pipeline",
             0.06, ("test_pipeline_dali.py",)),
    PartSpec("memory", "the memory plan against the measured peak", 0.07, ("test_memory.py",)),
    PartSpec("train_step", "the default training step, 20 steps: loss and img/s", 0.09,
             ("test_gpu_train_step.py",)),
    PartSpec("other", "every other GPU-only test", 0.05),
    PartSpec("kernel_suites", "the kernel test modules whose DEVICE follows CUDA, on CUDA", 0.16),
    PartSpec("benches", "every bench, --save-baseline (bench/results/<device>.json)", 0.38),
)
BENCH_ORDER = ("test_dino_loss.py", "test_ema.py", "test_dino_clstoken_loss.py", "test_ibot_patch_loss.py",
               "test_attention.py", "test_model.py", "test_train_step.py")   # then the rest; these last:
BENCH_LAST = ("test_pipeline.py", "test_eval.py", "test_peers.py")
KERNEL_SUITES_LAST = ("test_kernels_aot.py",)   # mostly ahead-of-time compiles, which CI runs on the CPU too


@dataclass
class Part:
    name: str
    what: str
    budget_s: float
    nodeids: list[str] = field(default_factory=list)
    pytest_args: list[str] = field(default_factory=list)   # besides the node ids


@dataclass
class Plan:
    budget_s: float
    parts: list[Part]
    collection_skips: list[dict]        # modules that did not collect: nodeid, outcome, reason
    unmarked: list[str]                 # GPU-only by skip reason, without the gpu marker
    gpu_only: list[str]                 # every GPU-only test (skip reason names CUDA / a GPU)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def gpu_tests(self) -> list[str]:
        return [n for p in self.parts if p.name != "benches" for n in p.nodeids]


def read_events(path: str) -> list[dict]:
    """The plugin's events; a line cut short by a kill is dropped."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def pytest_command(args: list[str], events: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "dino_fast.gpu_check.plugin", "--gpu-check-events", events,
            "-p", "no:cacheprovider", *args]


def collect(root: str = ROOT, paths: tuple[str, ...] = ("tests", "bench"),
            timeout_s: float = COLLECT_TIMEOUT_S) -> tuple[list[dict], list[dict]]:
    """(collected items, modules that did not collect) of `paths` under `root`."""
    missing = [p for p in paths if not os.path.isdir(os.path.join(root, p))]
    if missing:
        raise GpuCheckError(f"{root}: no {', '.join(missing)} folder: --gpu-check runs from a source checkout "
                                f"(git clone, then pip install -e . --no-deps --no-build-isolation)")
    with tempfile.TemporaryDirectory() as tmp:
        events = os.path.join(tmp, "collect.jsonl")
        try:
            proc = subprocess.run(pytest_command(["--collect-only", "-q", *paths], events), cwd=root,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise GpuCheckError(f"pytest --collect-only {' '.join(paths)} took more than {timeout_s:.0f} s") from exc
        ev = read_events(events)
    items = [e for e in ev if e["event"] == "collected"]
    skips = [e for e in ev if e["event"] == "collect"]
    if not items and proc.returncode not in (0, 5):
        raise GpuCheckError(f"pytest --collect-only {' '.join(paths)} failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return items, skips


def _bench_rank(file: str) -> tuple[int, str]:
    base = os.path.basename(file)
    if base in BENCH_ORDER:
        return BENCH_ORDER.index(base), base
    if base in BENCH_LAST:
        return len(BENCH_ORDER) + 1 + BENCH_LAST.index(base), base
    return len(BENCH_ORDER), base


def build_plan(items: list[dict], skips: list[dict], budget_s: float = DEFAULT_BUDGET_S) -> Plan:
    """Sort the collected items into the parts (see PARTS)."""
    tests = [it for it in items if it["file"].startswith("tests" + os.sep) or it["file"].startswith("tests/")]
    benches = [it for it in items if it["file"].startswith("bench" + os.sep) or it["file"].startswith("bench/")]
    chosen = {p.name: [] for p in PARTS}
    for it in tests:
        if not (it["gpu"] or it["needs_cuda"]):
            continue
        base = os.path.basename(it["file"])
        if it["needs_cuda"]:
            part = next((p.name for p in PARTS if base in p.files), "other")
        elif base == "test_gpu_train_step.py":
            part = "train_step"
        else:
            part = "kernel_suites"
        chosen[part].append(it["nodeid"])
    chosen["kernel_suites"].sort(key=lambda n: n.split("::")[0].endswith(KERNEL_SUITES_LAST))   # stable
    order = {it["nodeid"]: i for i, it in enumerate(benches)}
    chosen["benches"] = [it["nodeid"] for it in sorted(benches, key=lambda it: (_bench_rank(it["file"]),
                                                                                 order[it["nodeid"]]))]
    parts = [Part(p.name, p.what, round(p.share * budget_s, 1), chosen[p.name],
                  ["--save-baseline"] if p.name == "benches" else []) for p in PARTS]
    return Plan(budget_s, parts, skips,
                unmarked=[it["nodeid"] for it in tests if it["needs_cuda"] and not it["gpu"]],
                gpu_only=[it["nodeid"] for it in tests if it["needs_cuda"]])


def format_plan(plan: Plan, device_kind: str = "<device>") -> str:
    lines = [f"dino-fast bench --gpu-check would run, in {plan.budget_s:.0f} s at most "
             f"(a part's unused time passes to the next):"]
    for p in plan.parts:
        cmd = "pytest " + " ".join(p.pytest_args + ["<node ids>"])
        lines.append(f"\n[{p.name}] {p.what}: {len(p.nodeids)} item(s), {p.budget_s:.0f} s  ({cmd})")
        lines += [f"  {n}" for n in p.nodeids]
    if plan.collection_skips:
        lines.append("\nmodules that did not collect here (their tests run where they collect):")
        lines += [f"  {s['nodeid']}: {s['outcome']}: {s['reason']}" for s in plan.collection_skips]
    if plan.unmarked:
        lines.append("\nGPU-only tests without the gpu marker (run in [other]; add @pytest.mark.gpu):")
        lines += [f"  {n}" for n in plan.unmarked]
    lines.append(f"\nthen write bench/results/{device_kind}.json (merged with the benches' baseline) and "
                 f"bench/results/{device_kind}.md")
    return "\n".join(lines)
