"""The bench harness itself: peak lookup, the derived fields of a record,
the op-vs-reference runner, baseline comparison (slower fails, faster
passes, another device is never compared) through pytest itself, that
every bench file runs in smoke mode, `dino-fast bench` on the CPU, and the
README table generator."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from dino_fast import cli
from dino_fast.benchmark import baseline as bench_baseline
from dino_fast.benchmark.harness import Case, achieved_gbps, achieved_tflops, record, run_case
from dino_fast.devices import DeviceSpec, bf16_peak_tflops, device_spec, peaks_for_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = DeviceSpec("h100", "NVIDIA H100 80GB HBM3", 3350.0, 989.0)


# --------------------------------------------------------------------------- peaks and fields
@pytest.mark.parametrize("name,expect", [
    ("NVIDIA H100 80GB HBM3", ("h100", 3350.0, 989.0)),
    ("NVIDIA H100 PCIe", ("h100-pcie", 2000.0, 756.0)),
    ("NVIDIA H100 NVL", ("h100-nvl", 3900.0, 835.0)),
    ("NVIDIA H200", ("h200", 4800.0, 989.0)),
    ("NVIDIA GH200 480GB", ("gh200", 4000.0, 989.0)),
    ("NVIDIA A100-SXM4-80GB", ("a100", 2039.0, 312.0)),
    ("NVIDIA A100-SXM4-40GB", ("a100-40gb", 1555.0, 312.0)),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup(name, expect):
    assert peaks_for_name(name) == expect


def test_cpu_spec_has_a_measured_bandwidth():
    spec = device_spec("cpu")
    assert spec.kind == "cpu" and spec.hbm_gbps > 0.01


def test_record_fields_by_hand():
    # 6.7 GB in 2 ms = 3350 GB/s = the H100's HBM peak; 989 GFLOP in 2 ms = 494.5 TFLOP/s = half of bf16 peak
    rec = record(2.0, H100, nbytes=6.7e9, flops=989e9, ref_ms=10.0, peak_mem=123, op="x")
    assert rec["gbps"] == pytest.approx(3350.0) and rec["frac_hbm"] == pytest.approx(1.0)
    assert rec["tflops"] == pytest.approx(494.5) and rec["mfu"] == pytest.approx(0.5)
    assert rec["speedup"] == pytest.approx(5.0) and rec["ref_ms"] == 10.0
    assert rec["device"] == "h100" and rec["peak_extra_mem_bytes"] == 123 and rec["op"] == "x"
    assert achieved_gbps(1e9, 1000.0) == pytest.approx(1.0) and achieved_tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert "gbps" not in record(1.0, H100) and "speedup" not in record(1.0, H100)
    with pytest.raises(ValueError, match="ms must be > 0"):
        record(0.0, H100)


def test_run_case_checks_correctness_before_timing():
    x = torch.arange(1000.0)
    spec = DeviceSpec("cpu", "cpu", 10.0, 1.0)
    seen = []

    def check(out, ref):
        seen.append(True)
        torch.testing.assert_close(out, ref)
    rec = run_case(Case("double", lambda: x * 2, lambda: x + x, check, nbytes=8000), spec, smoke=True)
    assert seen and rec["op"] == "double" and rec["smoke"] is True
    assert rec["ms"] > 0 and rec["ref_ms"] > 0 and rec["speedup"] == pytest.approx(rec["ref_ms"] / rec["ms"])
    with pytest.raises(AssertionError):
        run_case(Case("wrong", lambda: x * 3, lambda: x + x, check), spec, smoke=True)


# --------------------------------------------------------------------------- baselines
def _baseline(device="h100", ms=1.0, smoke=False):
    return {"device": device, "device_name": "NVIDIA H100 80GB HBM3", "smoke": smoke,
            "cases": {"test_x.py::test_a": {"ms": ms}}}


@pytest.mark.parametrize("ms,status", [(1.2, "slower"), (1.09, "ok"), (0.95, "ok"), (0.8, "faster")])
def test_compare_case(ms, status):
    rec = {"device": "h100", "ms": ms, "smoke": False}
    c = bench_baseline.compare_case("test_x.py::test_a", rec, _baseline(), tolerance=0.10)
    assert c.status == status and c.base_ms == 1.0 and c.ratio == pytest.approx(ms)


def test_compare_never_crosses_devices_or_modes():
    rec = {"device": "h200", "ms": 50.0, "smoke": False}
    c = bench_baseline.compare_case("test_x.py::test_a", rec, _baseline("h100"))
    assert c.status == "not-compared" and "never compared" in c.note
    assert bench_baseline.compare_case("test_x.py::test_a", rec, None).status == "not-compared"
    smoke = {"device": "h100", "ms": 50.0, "smoke": True}
    assert bench_baseline.compare_case("test_x.py::test_a", smoke, _baseline()).status == "not-compared"
    new = bench_baseline.compare_case("test_x.py::test_new", {"device": "h100", "ms": 5.0}, _baseline())
    assert new.status == "new"


def test_save_merges_cases_and_writes_metadata(tmp_path):
    path = str(tmp_path / "h100.json")
    bench_baseline.save(path, "h100", "NVIDIA H100", {"a": {"ms": 1.0}, "b": {"ms": 2.0}}, smoke=False)
    data = bench_baseline.save(path, "h100", "NVIDIA H100", {"b": {"ms": 3.0}, "c": {"ms": 4.0}}, smoke=False)
    assert {k: v["ms"] for k, v in data["cases"].items()} == {"a": 1.0, "b": 3.0, "c": 4.0}
    on_disk = bench_baseline.load(path)
    assert on_disk == json.loads(json.dumps(data))
    assert on_disk["versions"]["torch"] == torch.__version__ and on_disk["date"] and on_disk["commit"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        bench_baseline.load(str(tmp_path / "bad.json"))


SYNTH = '''
import os, pytest
from dino_fast.benchmark import record
from dino_fast.devices import DeviceSpec

def _case(benchmark, kind, ms):
    ms = float(ms)
    benchmark.extra_info.update(record(ms, DeviceSpec(kind, kind.upper(), 1000.0, 100.0), nbytes=1e9,
                                       op="synthetic", smoke=False))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

def test_on_h100(benchmark):
    _case(benchmark, "h100", os.environ["SYNTH_MS"])

def test_on_a100(benchmark):
    _case(benchmark, os.environ.get("SYNTH_SECOND_DEVICE", "h100"),
          os.environ.get("SYNTH_SECOND_MS", os.environ["SYNTH_MS"]))
'''


def _pytest(tmp_path, ms, *opts, second="h100", second_ms=None):
    env = dict(os.environ, SYNTH_MS=str(ms), SYNTH_SECOND_DEVICE=second, PYTHONPATH=ROOT,
               SYNTH_SECOND_MS=str(second_ms or ms))
    cmd = [sys.executable, "-m", "pytest", str(tmp_path / "synthbench" / "test_synth.py"), "-q",
           "-p", "no:cacheprovider", "--benchmark-disable", "--baseline-dir", str(tmp_path / "results"), *opts]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_pytest_save_then_compare(tmp_path):
    d = tmp_path / "synthbench"
    d.mkdir()
    (d / "conftest.py").write_text("from bench.conftest import *  # noqa: F401,F403\n")
    (d / "test_synth.py").write_text(textwrap.dedent(SYNTH))
    r = _pytest(tmp_path, 1.0, "--save-baseline")
    assert r.returncode == 0, r.stdout + r.stderr
    saved = json.loads((tmp_path / "results" / "h100.json").read_text())
    assert saved["device"] == "h100" and saved["smoke"] is False
    assert {c: v["ms"] for c, v in saved["cases"].items()} == {"test_synth.py::test_on_h100": 1.0,
                                                               "test_synth.py::test_on_a100": 1.0}
    # 30 % slower than the committed baseline: both cases fail, naming the numbers
    r = _pytest(tmp_path, 1.3, "--compare-baseline")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 failed" in r.stdout and "30.0% slower than the baseline 1 ms" in r.stdout
    # ... unless the tolerance allows it
    r = _pytest(tmp_path, 1.3, "--compare-baseline", "--baseline-tolerance", "0.35")
    assert r.returncode == 0, r.stdout
    # faster passes; a case on another device kind, even 100x slower, is not compared (no a100
    # baseline; the h100 numbers are never used for it), with a note
    r = _pytest(tmp_path, 0.5, "--compare-baseline", second="a100", second_ms=100.0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "faster (0.50x)" in r.stdout and "no committed baseline for device 'a100'" in r.stdout


# --------------------------------------------------------------------------- every bench file runs
def test_every_bench_file_has_a_case_that_runs_in_smoke_mode(tmp_path):
    manifest = tmp_path / "manifest.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "--bench-manifest", str(manifest)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    items = json.loads(manifest.read_text())
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "test_*.py")))
    assert files
    for f in files:
        mine = [it for it in items if it["file"] == f]
        assert mine, f"bench/{f}: no test collected"
        if torch.cuda.is_available():
            continue
        assert any(not it["skipped"] for it in mine), f"bench/{f}: every case is skipped on the CPU (smoke mode)"


# --------------------------------------------------------------------------- dino-fast bench
def test_bench_command_on_cpu(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--cases", "dino_loss,ema", "--output", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["smoke"] is (not torch.cuda.is_available()) and report["versions"]["torch"]
    recs = {r["op"]: r for r in report["cases"]}
    assert set(recs) == {"dino_loss", "ema"} and all(r["status"] == "ok" for r in recs.values())
    assert recs["dino_loss"]["gbps"] > 0 and recs["ema"]["gbps"] > 0 and recs["ema"]["speedup"] > 0
    assert json.loads((out / "bench.json").read_text())["cases"][0]["op"] == "dino_loss"
    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.size[0] == 900 and png.size[1] >= 60 + 26 * 2

    # the human table; a case whose module is missing is reported, not dropped
    from dino_fast.benchmark import cases as bench_cases

    def missing(device, smoke):
        raise ImportError("No module named 'dino_fast.kernels.ema'")
    monkeypatch.setitem(bench_cases.CASES, "ema", missing)
    rc = cli.main(["bench", "--cases", "ema,knn", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0
    if not torch.cuda.is_available():
        assert "SMOKE MODE" in captured.out
    assert "op" in captured.out and "% of peak" in captured.out and "knn" in captured.out
    assert "ema: MISSING - ImportError: No module named 'dino_fast.kernels.ema'" in captured.out

    # a wrong result fails the command
    def wrong(device, smoke):
        x = torch.ones(3)
        return Case("wrong", lambda: x, lambda: x * 2, lambda a, b: torch.testing.assert_close(a, b))
    monkeypatch.setitem(bench_cases.CASES, "ema", wrong)
    assert cli.main(["bench", "--cases", "ema", "--output", str(out)]) == 1
    assert "failed" in capsys.readouterr().err
    assert cli.main(["bench", "--cases", "nope", "--output", str(out)]) == 2


# --------------------------------------------------------------------------- README table
def test_bench_table_rewrites_only_its_block(tmp_path):
    from dino_fast.benchmark import table as bt
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n\n{bt.START}\nold text\n{bt.END}\nafter\n")
    results = tmp_path / "results"
    results.mkdir()
    assert bt.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n\n") and text.endswith(f"{bt.END}\nafter\n")
    assert "No GPU results committed yet" in text and "old text" not in text
    assert bt.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0

    rec = record(0.25, H100, nbytes=6.7e8, ref_ms=5.0, op="dino_loss", ref_name="reference DINOLoss")
    bench_baseline.save(str(results / "h100.json"), "h100", H100.name, {"test_dino_loss.py::test_a": rec}, False)
    bench_baseline.save(str(results / "cpu.json"), "cpu", "cpu", {"test_dino_loss.py::test_a": rec}, True)
    assert bt.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    bt.main(["--readme", str(readme), "--results", str(results)])
    text = readme.read_text()
    # 0.67 GB in 0.25 ms = 2680 GB/s = 80 % of 3350; 5 / 0.25 = 20x
    assert "| `test_dino_loss.py::test_a` | 0.25 | 20.00× reference DINOLoss | 2680 GB/s | 80 |" in text
    assert "NVIDIA H100 80GB HBM3" in text and "cpu" not in text.split(bt.START)[1].split("|")[0]
    assert "No GPU results committed yet" not in text

    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench-table:start"):
        bt.main(["--readme", str(readme), "--results", str(results)])


def test_bench_table_script_checks_a_stale_readme(tmp_path):
    # CI runs `python tools/bench_table.py --check`: the script is the table module's main
    from dino_fast.benchmark import table as bt
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{bt.START}\nstale\n{bt.END}\n")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_table.py"), "--readme", str(readme),
           "--results", str(tmp_path)]
    stale = subprocess.run(cmd + ["--check"], capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0
    assert subprocess.run(cmd + ["--check"], capture_output=True, text=True, timeout=120).returncode == 0


# --------------------------------------------------------------------------- bytes-moved formulas
def test_dino_loss_traffic_matches_the_kernels_passes():
    from dino_fast.benchmark.cases import dino_loss_traffic
    from dino_fast.kernels import dino_loss as dl
    from tests.launch_recorder import record_launches
    # by hand, B = 64, K = 65536, 12 views, 2 teacher views, fp32: 3 x 201,326,592 B of student traffic
    # (2 reads + the gradient write) + 3 x 33,554,432 B of teacher reads
    t = dino_loss_traffic(64, 65536, 12, 2, 4)
    assert t["nbytes"] == 3 * 201_326_592 + 3 * 33_554_432 and t["floor"] == "student 2R+1W, teacher 3R"
    assert dino_loss_traffic(64, 65536, 12, 2, 2)["nbytes"] == t["nbytes"] // 2
    # the launches of one forward + backward: which kernels take the full student / teacher / gradient
    B, K, V = 3, 40, 4
    s = torch.randn(V * B, K).requires_grad_()
    teacher = torch.randn(2 * B, K)
    with record_launches(dl) as rec:
        loss, _ = dl.dino_loss(s, teacher, torch.zeros(1, K), V, 0.04, impl="triton")
        loss.backward()
    def passes(tensor, arg_names):
        return sum(1 for l in rec.launches for n in arg_names
                   if getattr(l.args.get(n), "data_ptr", lambda: None)() == tensor.data_ptr())
    assert passes(s, ("s_ptr",)) == 2 and passes(teacher, ("t_ptr",)) == 3
    assert sum("grad_ptr" in l.args for l in rec.launches) == 1
    r = record(1.0, H100, **t)
    assert r["floor"] == "student 2R+1W, teacher 3R" and r["nbytes"] == t["nbytes"]
    assert r["floor_ms"] == pytest.approx(t["nbytes"] / 3350e9 * 1e3)


def test_ema_traffic_counts_each_dtype():
    from dino_fast.benchmark.cases import ema_traffic
    teacher = [torch.zeros(10), torch.zeros(3, 4)]                                  # fp32
    student = [torch.zeros(10, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16)]
    # per element: teacher read + written (2 x 4 B) + student read (2 B) = 10 B; 22 elements
    assert ema_traffic(teacher, student) == {"nbytes": 220, "floor": "teacher 1R+1W, student 1R"}


def test_mfu_peak_needs_no_measurement(monkeypatch):
    import dino_fast.devices as devices
    monkeypatch.setattr(devices, "measured_bandwidth_gbps", lambda *a, **k: pytest.fail("measured"))
    assert bf16_peak_tflops("cpu") == devices.CPU_TFLOPS == 1.0
