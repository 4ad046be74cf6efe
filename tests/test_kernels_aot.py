"""Ahead-of-time compile of every Triton kernel (kernels/aot.py, `dino-fast
kernels`): the registry is complete, every declared spec compiles for sm_90
without spills, broken specs fail with their name, the launchers launch only
declared configurations, and the occupancy arithmetic matches hand values.

The full compile of every spec for sm_90 is the slow part (~30 s of CPU on a
cold Triton cache); CI then runs `dino-fast kernels --arch sm_80,sm_90`.
"""
import glob
import json
import os
import re

import pytest
import torch

from dino_fast import cli
from dino_fast.kernels import aot
from dino_fast.kernels.spec import KernelSpec
from tests import launch_recorder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the interpreter runs the kernels on CPU
pytestmark = pytest.mark.gpu   # DEVICE follows CUDA: dino-fast bench --gpu-check runs this module
KERNELS_DIR = os.path.join(os.path.dirname(__file__), "..", "kernels")
FIXTURE = "tests.kernels_broken_fixture"


def _cli_json(capsys, *argv):
    rc = cli.main(["kernels", *argv, "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


# --------------------------------------------------------------------------- registry
def test_every_module_with_a_triton_kernel_is_registered():
    found = set()
    for path in glob.glob(os.path.join(KERNELS_DIR, "*.py")):
        with open(path) as f:
            if re.search(r"^@triton\.(jit|autotune|heuristics)", f.read(), re.M):
                found.add("dino_fast.kernels." + os.path.basename(path)[:-3])
    assert found, "no Triton kernel module found under kernels/"
    assert found <= set(aot.KERNEL_MODULES), (
        f"add {sorted(found - set(aot.KERNEL_MODULES))} to KERNEL_MODULES in kernels/aot.py")


def test_registered_modules_declare_well_formed_specs():
    specs, errors = aot.load_specs(aot.KERNEL_MODULES)
    assert not errors, [e.error for e in errors]
    for module in aot.KERNEL_MODULES:
        assert any(m == module for m, _ in specs), f"{module}.compile_specs() declared nothing"
    for _, spec in specs:
        assert isinstance(spec, KernelSpec)
        assert set(spec.signature) == set(spec.fn.arg_names), spec.name
        assert {k for k, v in spec.signature.items() if v == "constexpr"} == set(spec.constexprs), spec.name
        assert aot.grid_size(spec.problem), f"{spec.name}: problem['grid'] missing (needed for waves)"


def test_missing_module_and_missing_function_are_reported():
    specs, errors = aot.load_specs(["dino_fast.kernels.no_such_kernel", f"{FIXTURE}:no_such_specs"])
    assert not specs and len(errors) == 2
    assert "no_such_kernel" in errors[0].error
    assert "no_such_specs" in errors[1].error


# --------------------------------------------------------------------------- compile
def test_every_declared_kernel_compiles_for_sm90_without_spills(capsys):
    rc, report, err = _cli_json(capsys, "--arch", "sm_90")
    assert rc == 0, err
    specs, _ = aot.load_specs(aot.KERNEL_MODULES)
    rows = report["rows"]
    assert len(rows) == len(specs) and report["failures"] == []
    declared = {(s.name, s.dtype, s.config) for _, s in specs}
    assert {(r["kernel"], r["dtype"], r["config"]) for r in rows} == declared
    for r in rows:
        assert r["ok"] and r["arch"] == "sm_90"
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0, r
        assert r["blocks_per_sm"] >= 1 and r["waves"] >= 1, r


def test_broken_specs_fail_naming_kernel_config_and_arch(capsys):
    rc, report, err = _cli_json(capsys, "--arch", "sm_90", "--modules", f"{FIXTURE}:broken_specs")
    assert rc == 1
    fails = "\n".join(report["failures"])
    # a non-power-of-two tl.arange: the compiler's own message, with the spec named
    assert "npow2_copy [fp32; BLOCK=24,warps=1,stages=1] on sm_90: compile failed" in fails
    assert "arange's range must be a power of 2" in fails
    # 256x256x128 bf16 tiles over 4 stages: more shared memory than an H100 block may use
    assert re.search(r"tile_dot \[bf16; BK=128,BM=256,BN=256,warps=8,stages=4\] on sm_90: compile failed: "
                     r"needs \d+ bytes of shared memory per block; H100 SXM allows 232448", fails)
    # 4096 fp32 on one warp: > 255 registers per thread, ptxas spills
    assert re.search(r"row_softmax_spill \[fp32; BLOCK=4096,warps=1,stages=1\] on sm_90: spills \d+ B", fails)
    assert "FAIL npow2_copy" in err and "FAIL tile_dot" in err and "FAIL row_softmax_spill" in err
    spill = next(r for r in report["rows"] if r["kernel"] == "row_softmax_spill")
    assert spill["ok"] and spill["regs"] == 255 and spill["spill_bytes"] > 0
    # a budget above the spill lets that one pass; the others still fail
    rc2, report2, _ = _cli_json(capsys, "--arch", "sm_90", "--modules", f"{FIXTURE}:broken_specs",
                                "--max-spill-bytes", str(spill["spill_bytes"]))
    assert rc2 == 1 and not any("row_softmax_spill" in f for f in report2["failures"])
    assert len(report2["failures"]) == 2


def test_table_and_result_files(tmp_path, capsys):
    rc = cli.main(["kernels", "--arch", "sm_80,sm_90", "--modules", f"{FIXTURE}:good_specs",
                   "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "row_scale" in out and "4/4 kernel configurations compiled" in out
    data = json.loads((tmp_path / "kernels_sm90.json").read_text())
    assert data["arch"] == "sm_90" and data["ptxas_gpu_name"] == "sm_90a" and data["sms"] == 132
    assert {r["dtype"] for r in data["rows"]} == {"fp32", "bf16"}
    md = (tmp_path / "kernels_sm90.md").read_text()
    assert "| row_scale | bf16 | BLOCK=1024,warps=4,stages=1 | sm_90 |" in md
    assert (tmp_path / "kernels_sm80.json").exists()


def test_bad_arch_is_a_usage_error(capsys):
    assert cli.main(["kernels", "--arch", "sm_75"]) == 2
    assert "sm_75" in capsys.readouterr().err


def test_compile_runs_without_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 on CPU; the workers must drop it
    assert "TRITON_INTERPRET" not in aot._clean_env()
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert aot._main(["--entries", f"{FIXTURE}:good_specs", "--arch", "sm_90"]) == 2


# --------------------------------------------------------------------------- numbers
def test_parse_ptxas_report():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spill' for 'sm_90a'
ptxas info    : Function properties for spill
    64 bytes stack frame, 64 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 64 bytes cumulative stack size
"""
    assert aot.parse_ptxas(log) == {"regs": 255, "stack_bytes": 64, "spill_store_bytes": 64,
                                    "spill_load_bytes": 72, "static_smem": 2048}
    with pytest.raises(ValueError, match="no register report"):
        aot.parse_ptxas("ptxas fatal : Unsupported .version 9.3")


def test_occupancy_and_waves_by_hand():
    h100, a100 = aot.ARCHS["sm_90"], aot.ARCHS["sm_80"]
    # 48 regs x 32 threads = 1536 per warp -> 42 warps of 64K registers -> 5 blocks of 8 warps
    assert aot.occupancy(h100, 48, 0, 8) == (5, "regs")
    # 255 regs round up to 256 -> 8192 per warp -> 8 warps -> 2 blocks of 4 warps
    assert aot.occupancy(h100, 255, 0, 4) == (2, "regs")
    # 16 regs, 1 warp per block: the 32-blocks-per-SM limit binds
    assert aot.occupancy(h100, 16, 0, 1) == (32, "blocks")
    # 16 regs, 4 warps: 64 warps per SM / 4 = 16 blocks
    assert aot.occupancy(h100, 16, 0, 4) == (16, "warps")
    # 100 KB of shared memory (+1 KB reserved): 228 KB -> 2 blocks on H100, 164 KB -> 1 on A100
    assert aot.occupancy(h100, 32, 100 * 1024, 4) == (2, "smem")
    assert aot.occupancy(a100, 32, 100 * 1024, 4) == (1, "smem")
    # 26671 programs, 5 blocks per SM on 132 SMs: 660 per wave -> 41 waves; 1 program -> 1
    assert aot.waves(26671, 5, 132) == 41
    assert aot.waves(660, 5, 132) == 1 and aot.waves(661, 5, 132) == 2
    assert aot.waves(10, 0, 132) is None
    assert aot.grid_size({"grid": (64, 16)}) == 1024 and aot.grid_size({}) is None


def test_alignment_hints_reach_the_compiler():
    from tests.kernels_broken_fixture import row_scale
    sig = {"x_ptr": "*fp32", "y_ptr": "*bf16", "n_cols": "i32", "scale": "fp32", "BLOCK": "constexpr"}
    div = [["tt.divisibility", 16]]
    # pointers always (torch allocations are 256-byte aligned); integers only when declared
    assert aot._attrs(row_scale, sig, ()) == {(0,): div, (1,): div}
    assert aot._attrs(row_scale, sig, ("n_cols",)) == {(0,): div, (1,): div, (2,): div}


# --------------------------------------------------------------------------- launcher/spec drift
def _ema_launches(ema):
    g = torch.Generator().manual_seed(0)
    with launch_recorder.record_launches(ema) as rec:
        for t_dt in (torch.float32, torch.bfloat16):
            for s_dt in (torch.float32, torch.bfloat16):
                sizes = [5000, 7]
                t = [torch.randn(n + 1, generator=g).to(DEVICE, t_dt) for n in sizes]
                s = [torch.randn(n + 1, generator=g).to(DEVICE, s_dt) for n in sizes]
                ema.ema_update_([x[:-1] for x in t], [x[:-1] for x in s], 0.99, impl="triton")  # aligned
                ema.ema_update_([x[1:] for x in t], [x[1:] for x in s],                           # unaligned
                                torch.tensor(0.99, dtype=torch.float64, device=DEVICE), impl="triton")
    return rec.launches


def test_ema_launches_only_declared_configs(monkeypatch):
    from dino_fast.kernels import ema
    specs = ema.compile_specs()
    launches = _ema_launches(ema)
    assert len(launches) == 8
    assert {(l.args["ALIGNED"], l.args["MOM_FROM_PTR"]) for l in launches} == {(True, False), (False, True)}
    assert launch_recorder.undeclared_launches(launches, specs) == []
    assert [l.kernel for l in launches if l.n_positional] == []           # every argument by keyword
    # the detector itself: a launcher that drifted from the declared table is caught
    monkeypatch.setattr(ema, "NUM_WARPS", ema.NUM_WARPS // 2)
    drifted = launch_recorder.undeclared_launches(_ema_launches(ema), specs)
    assert drifted and all("_ema_kernel" in d and "num_warps" in d for d in drifted)


def test_dino_loss_launches_only_declared_configs():
    from dino_fast.kernels import dino_loss as dl
    specs = dl.compile_specs()
    g = torch.Generator().manual_seed(0)
    B, K = 2, 37
    with launch_recorder.record_launches(dl) as rec:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for ncrops, n_tv in ((3, 2), (6, 2), (5, 4)):
                s = torch.randn(ncrops * B, K, generator=g).to(DEVICE, dtype).requires_grad_()
                t = torch.randn(n_tv * B, K, generator=g).to(DEVICE, dtype)
                loss, _ = dl.dino_loss(s, t, torch.zeros(1, K, device=DEVICE), ncrops, 0.04, n_teacher_views=n_tv,
                                       impl="triton")
                loss.backward()
                assert torch.isfinite(s.grad).all()
    launched = {l.kernel for l in rec.launches}
    declared = {launch_recorder._base_function(sp.fn).__name__ for sp in specs}
    assert {"_student_fwd_kernel", "_student_grad_kernel"} <= launched <= declared
    assert launch_recorder.undeclared_launches(rec.launches, specs) == []
    assert [l.kernel for l in rec.launches if l.n_positional] == []       # every argument by keyword
