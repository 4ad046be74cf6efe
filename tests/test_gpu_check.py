"""`dino-fast bench --gpu-check` on the CPU: the plan lists every GPU test that exists (none
forgotten), --dry-run prints it, a part that runs out of time is reported as such, and the
summary writer's JSON / markdown carry each figure and each outcome."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from dino_fast.benchmark import baseline as bench_baseline
from dino_fast.benchmark.table import render
from dino_fast.gpu_check import check
from dino_fast.gpu_check.plan import Part, Plan, build_plan, read_events
from dino_fast.gpu_check.runner import PartResult, run_part
from dino_fast.gpu_check.summary import build_report, write_results

ROOT = bench_baseline.ROOT

# An inventory written here, independent of the gpu-check plugin: a test is GPU-only when a
# skip / skipif mark skips it on this (GPU-less) machine for a reason naming CUDA or a GPU;
# a kernel module's tests all run on CUDA when its DEVICE line follows torch.cuda.
INVENTORY = '''
import json, os, re
_out = []
def pytest_collection_modifyitems(config, items):
    for it in items:
        gpu_only = False
        for m in it.iter_markers():
            reason = str(m.kwargs.get("reason", ""))
            on = m.name == "skip" or (m.name == "skipif" and m.args and all(bool(a) for a in m.args))
            gpu_only |= on and bool(re.search("cuda|gpu", reason, re.I))
        src = open(str(it.path)).read()
        device = bool(re.search(r'^DEVICE = "cuda" if torch.cuda.is_available\\(\\)', src, re.M))
        _out.append(dict(nodeid=it.nodeid, gpu_only=gpu_only, device_module=device,
                         marked=it.get_closest_marker("gpu") is not None))
    with open(os.environ["INVENTORY_OUT"], "w") as f:
        json.dump(_out, f)
'''


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """One collection of tests/ and bench/ with both the gpu-check plugin and the inventory."""
    tmp = tmp_path_factory.mktemp("inventory")
    (tmp / "_inventory.py").write_text(INVENTORY)
    events, out = tmp / "events.jsonl", tmp / "inventory.json"
    env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "INVENTORY_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "_inventory", "-p", "dino_fast.gpu_check.plugin", "--gpu-check-events",
                           str(events), "tests", "bench"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    ev = read_events(str(events))
    return (json.loads(out.read_text()), [e for e in ev if e["event"] == "collected"],
            [e for e in ev if e["event"] == "collect"])


def test_plan_lists_every_gpu_test_and_every_bench(collected):
    inventory, items, skips = collected
    plan = build_plan(items, skips)
    in_tests = [i for i in inventory if i["nodeid"].startswith("tests/")]
    gpu_only = {i["nodeid"] for i in in_tests if i["gpu_only"]}
    expected = gpu_only | {i["nodeid"] for i in in_tests if i["device_module"]}
    listed = plan.gpu_tests
    assert len(listed) == len(set(listed)), "a test is listed twice"
    assert set(listed) == expected, (f"forgotten: {sorted(expected - set(listed))}; "
                                     f"not GPU tests: {sorted(set(listed) - expected)}")
    assert gpu_only >= {"tests/test_gpu_train_step.py::test_default_step_20_steps_matches_plain_step_cuda",
                        "tests/test_memory.py::test_estimate_matches_measured_peak_on_gpu[False]"}
    # every GPU-only test carries the marker (none runs only because of its skip reason)
    assert plan.unmarked == [] and all(i["marked"] for i in in_tests if i["gpu_only"])
    benches = {i["nodeid"] for i in inventory if i["nodeid"].startswith("bench/")}
    part = {p.name: p for p in plan.parts}
    assert set(part["benches"].nodeids) == benches and part["benches"].pytest_args == ["--save-baseline"]
    assert part["benches"].nodeids[0].startswith("bench/test_dino_loss.py")
    # the named checks sit in their parts
    assert all("test_memory.py" in n for n in part["memory"].nodeids) and part["memory"].nodeids
    assert part["train_step"].nodeids == [
        "tests/test_gpu_train_step.py::test_default_step_20_steps_matches_plain_step_cuda"]
    assert any("[xformers]" in n for n in part["attention"].nodeids)
    assert part["kernel_suites"].nodeids[-1].startswith("tests/test_kernels_aot.py")
    assert abs(sum(p.budget_s for p in plan.parts) - 480) < 1


# --------------------------------------------------------------------------- a synthetic checkout
SYNTHETIC = {
    "pytest.ini": "[pytest]\nmarkers =\n    gpu: gpu test\n",
    "tests/__init__.py": "",
    "tests/test_ema.py": """
        import os, time, pytest
        @pytest.mark.gpu
        @pytest.mark.skipif(False, reason="needs a CUDA GPU")
        def test_cuda_pass():
            pass
        @pytest.mark.gpu
        def test_cuda_fail():
            assert 1 + 1 == 3, "one plus one"
        @pytest.mark.gpu
        def test_cuda_skip():
            pytest.skip("xformers is not installed")
        @pytest.mark.gpu
        def test_cuda_sleeps():
            time.sleep(float(os.environ.get("SYNTHETIC_SLEEP_S", "60")))
        @pytest.mark.gpu
        def test_cuda_after():
            pass
        def test_cpu_only():
            pass
    """,
    "tests/test_misc.py": """
        import pytest
        @pytest.mark.skipif(True, reason="needs a CUDA GPU")
        def test_unmarked_gpu():
            pass
    """,
    "bench/__init__.py": "",
    "bench/conftest.py": """
        def pytest_addoption(parser):
            parser.addoption("--save-baseline", action="store_true")
    """,
    "bench/test_fast.py": """
        def test_case(benchmark, record_property):
            benchmark.extra_info.update(device="h200", device_name="NVIDIA H200", ms=2.0, ref_ms=5.0, speedup=2.5,
                                        gbps=2928.0, frac_hbm=0.61, floor="teacher 3R", ref_name="torch")
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    """,
}


@pytest.fixture
def checkout(tmp_path):
    for rel, text in SYNTHETIC.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_dry_run_cli_prints_the_plan(checkout, monkeypatch, capsys):
    from dino_fast.cli import main
    monkeypatch.setattr(check, "ROOT", str(checkout))
    assert main(["bench", "--gpu-check", "--dry-run", "--json", "--time-budget", "100"]) == 0
    plan = json.loads(capsys.readouterr().out)
    parts = {p["name"]: p for p in plan["parts"]}
    assert parts["triton"]["nodeids"] == ["tests/test_ema.py::test_cuda_pass"]
    assert parts["kernel_suites"]["nodeids"] == [f"tests/test_ema.py::test_cuda_{n}"
                                                 for n in ("fail", "skip", "sleeps", "after")]
    assert parts["other"]["nodeids"] == ["tests/test_misc.py::test_unmarked_gpu"]
    assert plan["unmarked"] == ["tests/test_misc.py::test_unmarked_gpu"]
    assert parts["benches"]["nodeids"] == ["bench/test_fast.py::test_case"]
    assert plan["budget_s"] == 100 and parts["benches"]["budget_s"] == 38.0
    assert main(["bench", "--gpu-check", "--dry-run", "--time-budget", "100"]) == 0
    text = capsys.readouterr().out
    assert "[other] every other GPU-only test: 1 item(s)" in text and "add @pytest.mark.gpu" in text
    # the run needs a GPU; --dry-run alone is a usage error
    assert main(["bench", "--gpu-check"]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert main(["bench", "--dry-run"]) == 2


def test_a_part_out_of_time_keeps_what_it_finished(checkout, tmp_path):
    ids = [f"tests/test_ema.py::test_cuda_{n}" for n in ("pass", "fail", "skip", "sleeps", "after")]
    res = run_part(Part("kernel_suites", "synthetic", 10.0, ids), 10.0, str(tmp_path / "work"), str(checkout))
    assert res.status == "timed out" and res.seconds < 30
    got = {t["nodeid"].split("::")[1]: t for t in res.tests}
    assert [got[k]["outcome"] for k in ("test_cuda_pass", "test_cuda_fail", "test_cuda_skip", "test_cuda_sleeps",
                                        "test_cuda_after")] == ["passed", "failed", "skipped", "timed out", "not run"]
    assert "one plus one" in got["test_cuda_fail"]["reason"]
    assert got["test_cuda_skip"]["reason"] == "xformers is not installed"
    assert "ran out of time (10 s)" in got["test_cuda_sleeps"]["reason"]


def test_run_check_end_to_end_with_a_pretend_gpu(checkout, tmp_path, monkeypatch, capsys):
    """The whole command on the synthetic checkout, torch told a GPU is there: every part runs,
    the failing test fails the check, the results land in the results folder."""
    import torch

    import dino_fast.devices
    from dino_fast.devices import DeviceSpec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dino_fast.devices, "device_spec", lambda device=None: DeviceSpec("h200", "NVIDIA H200",
                                                                                         4800.0, 989.0))
    monkeypatch.setattr("dino_fast.gpu_check.summary.optional_packages", lambda: {"xformers": "0.0.99"})
    monkeypatch.setenv("SYNTHETIC_SLEEP_S", "0")
    results = tmp_path / "results"
    rc = check.run_check(120.0, str(results), str(tmp_path / "work"), root=str(checkout), echo=print)
    out = capsys.readouterr().out
    assert rc == 1, out
    data = json.loads((results / "h200.json").read_text())
    status = {p["name"]: (p["status"], p["counts"]) for p in data["gpu_check"]["parts"]}
    assert status["triton"] == ("passed", {"passed": 1})
    assert status["kernel_suites"] == ("failed", {"passed": 2, "failed": 1, "skipped": 1})
    assert status["other"] == ("passed", {"skipped": 1}) and status["memory"] == ("empty", {})
    assert status["benches"] == ("passed", {"passed": 1})
    assert data["cases"]["test_fast.py::test_case"]["speedup"] == 2.5
    md = (results / "h200.md").read_text()
    assert "| `tests/test_ema.py::test_cuda_fail` | kernel_suites | FAILED | AssertionError: one plus one" in md
    assert "xformers 0.0.99" in md and "wrote " + str(results / "h200.json") in out


def _result(name, status, tests, seconds=3.0, budget=10.0):
    return PartResult(name, f"{name} things", status, budget, seconds, 0 if status == "passed" else 1,
                      None, tests)


def test_summary_writer_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_baseline, "git_commit", lambda cwd=None: "abc1234")
    # a baseline from an earlier bench run of the same device: its other cases are kept
    bench_baseline.save(str(tmp_path / "h200.json"), "h200", "NVIDIA H200", {"old.py::kept": {"ms": 9.0}}, False)
    t = lambda nodeid, outcome, reason="", **kw: dict(nodeid=nodeid, outcome=outcome, reason=reason,  # noqa: E731
                                                       duration_s=0.1, properties=kw.get("props", {}),
                                                       bench=kw.get("bench"))
    bench_rec = dict(device="h200", device_name="NVIDIA H200", ms=2.0, ref_ms=5.0, speedup=2.5, gbps=2928.0,
                     frac_hbm=0.61, floor="student 2R+1W, teacher 3R", ref_name="DINOLossReference")
    mfu_rec = dict(device="h200", device_name="NVIDIA H200", ms=40.0, ref_ms=80.0, speedup=2.0, tflops=494.5,
                   mfu=0.5, ref_name="reference step")
    parts = [
        _result("triton", "failed", [t("tests/test_dino_loss.py::test_cuda_matches_reference[dtype0]", "passed"),
                                     t("tests/test_ema.py::test_cuda_against_exact[a]", "failed",
                                       "AssertionError: 3 of 17 elements off")]),
        _result("attention", "passed", [t("tests/test_attention.py::test_x[xformers]", "skipped",
                                          "xformers is not installed")]),
        _result("train_step", "passed", [t("tests/test_gpu_train_step.py::test_default", "passed",
                                           props={"gpu_check_figures": {"img_per_s": 812.5, "loss_last": 10.25}})]),
        _result("kernel_suites", "timed out", [t("tests/test_softmax_ce.py::test_a", "passed"),
                                               t("tests/test_softmax_ce.py::test_b", "timed out",
                                                 "the part ran out of time (77 s) in this test")]),
        _result("benches", "passed", [t("bench/test_dino_loss.py::test_dino_loss[fwd_bwd]", "passed", bench=bench_rec),
                                      t("bench/test_train_step.py::test_train_step[vit_s16]", "passed", bench=mfu_rec),
                                      t("bench/test_train_step.py::test_train_step[smoke]", "skipped",
                                        "smoke case on the CPU only")]),
    ]
    plan = Plan(475.0, [], [{"nodeid": "tests/test_pipeline_dali.py", "outcome": "skipped",
                             "reason": "could not import 'nvidia.dali'"}], [], [])
    section, cases = build_report(parts, plan, 401.2, {"xformers": None, "nvidia.dali": None, "flash_varlen": True})
    json_path, md_path = write_results(str(tmp_path), "h200", "NVIDIA H200", section, cases)
    assert json_path == str(tmp_path / "h200.json") and md_path == str(tmp_path / "h200.md")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    data = json.loads(open(json_path).read())
    assert data["device"] == "h200" and data["commit"] == "abc1234" and data["smoke"] is False
    assert set(data["cases"]) == {"old.py::kept", "test_dino_loss.py::test_dino_loss[fwd_bwd]",
                                  "test_train_step.py::test_train_step[vit_s16]"}
    g = data["gpu_check"]
    assert [(p["name"], p["status"]) for p in g["parts"]] == [
        ("triton", "failed"), ("attention", "passed"), ("train_step", "passed"), ("kernel_suites", "timed out"),
        ("benches", "passed")]
    assert g["parts"][0]["counts"] == {"passed": 1, "failed": 1}
    outcome = {x["nodeid"]: (x["part"], x["outcome"], x["reason"]) for x in g["tests"]}
    assert outcome["tests/test_ema.py::test_cuda_against_exact[a]"] == (
        "triton", "failed", "AssertionError: 3 of 17 elements off")
    assert outcome["bench/test_train_step.py::test_train_step[smoke]"][1:] == ("skipped", "smoke case on the CPU only")
    assert g["figures"] == [{"nodeid": "tests/test_gpu_train_step.py::test_default", "img_per_s": 812.5,
                             "loss_last": 10.25}]

    md = open(md_path).read()
    assert md.startswith("# GPU check: NVIDIA H200 (`h200`)")
    assert "commit `abc1234`" in md and data["date"] in md and "xformers not installed" in md
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in md.splitlines()
            if r.startswith("| `")}
    # ms, reference ms, x reference, achieved, % of hardware limit, the limit
    assert rows["`test_dino_loss.py::test_dino_loss[fwd_bwd]`"] == [
        "2", "5", "2.50× DINOLossReference", "2928 GB/s", "61.0", "HBM peak (student 2R+1W, teacher 3R)"]
    assert rows["`test_train_step.py::test_train_step[vit_s16]`"][2:] == [
        "2.00× reference step", "494.5 TFLOP/s", "50.0", "bf16 dense peak (MFU)"]
    assert rows["`tests/test_ema.py::test_cuda_against_exact[a]`"] == [
        "triton", "FAILED", "AssertionError: 3 of 17 elements off"]
    assert rows["`tests/test_attention.py::test_x[xformers]`"] == ["attention", "skipped", "xformers is not installed"]
    assert rows["`tests/test_softmax_ce.py::test_b`"][1] == "TIMED OUT"
    assert "| kernel_suites | TIMED OUT | 1 | 0 | 0 | 1 |" in md
    assert "| 1 more in kernel_suites | kernel_suites | passed | |" in md
    assert "img_per_s 812" in md and "tests/test_pipeline_dali.py`: skipped: could not import" in md

    # tools/bench_table.py reads the same file: the README's device table and a line on the check
    table = render(str(tmp_path))
    assert "**NVIDIA H200**" in table and "`test_dino_loss.py::test_dino_loss[fwd_bwd]` | 2 | 2.50×" in table
    assert re.search(r"GPU tests 1 failed, 3 passed, 1 skipped, 1 timed out; parts not passed: triton, "
                     r"kernel_suites \(\[bench/results/h200.md\]", table), table


def test_plan_rejects_a_checkout_without_tests(tmp_path, monkeypatch, capsys):
    from dino_fast.cli import main
    monkeypatch.setattr(check, "ROOT", str(tmp_path))
    assert main(["bench", "--gpu-check", "--dry-run"]) == 2
    assert "no tests, bench folder: --gpu-check runs from a source checkout" in capsys.readouterr().err
