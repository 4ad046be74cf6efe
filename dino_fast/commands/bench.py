"""`dino-fast bench`: run the key hot-path cases (fused loss, EMA, model
forward+backward, pipeline, training step, k-NN), each against its reference
in the same run; print a table (op, ms, GB/s or TFLOP/s, % of peak, ratio to
the reference), write a bar chart PNG and, with --json, the records.

On a machine without a GPU it runs the smoke shapes (tiny, correctness only)
and says so. A case whose module cannot be imported is reported as missing.
"""
from __future__ import annotations

import json
import os
import sys

HELP = "benchmark the hot paths against their references"


def add_arguments(parser) -> None:
    from dino_fast.flags import add_bool_argument
    add_bool_argument(parser, "--json", help="print the records as JSON")
    parser.add_argument("--output", default=os.path.join("output", "bench"),
                        help="directory for bench.json and bench.png (default ./output/bench)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated subset of: dino_loss, ema, model_fwd_bwd, pipeline_epoch, "
                             "train_step, knn (default: all)")
    add_bool_argument(parser, "--smoke", help="tiny shapes even on a GPU")
    add_bool_argument(parser, "--gpu-check", help="every GPU test, then every bench --save-baseline, in a time "
                      "budget; writes bench/results/<device>.json and .md (dino_fast.gpu_check)")
    add_bool_argument(parser, "--dry-run", help="with --gpu-check: list what it would run (works on a CPU)")
    parser.add_argument("--time-budget", type=float, default=480.0,
                        help="with --gpu-check: seconds for the whole check (default 480)")


def _row(rec: dict) -> list[str]:
    if "gbps" in rec:
        rate, frac = f"{rec['gbps']:.1f} GB/s", rec["frac_hbm"]
    elif "tflops" in rec:
        rate, frac = f"{rec['tflops']:.2f} TFLOP/s", rec["mfu"]
    else:
        rate, frac = "-", None
    return [rec["op"], f"{rec['ms']:.3f}", rate, "-" if frac is None else f"{100 * frac:.1f}",
            "-" if rec.get("speedup") is None else f"{rec['speedup']:.2f}x", rec.get("ref_name") or "-"]


HEADER = ["op", "ms", "achieved", "% of peak", "vs reference", "reference"]


def format_table(records: list[dict]) -> str:
    rows = [HEADER] + [_row(r) for r in records if r.get("status") == "ok"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"{r['op']}: {r['status'].upper()} - {r['error']}")
    return "\n".join(lines)


def run_cases(names: list[str], device, smoke: bool, spec) -> list[dict]:
    """One record per case: status ok (with the standard fields), missing
    (its module cannot be imported) or failed (wrong result or error)."""
    import torch

    from dino_fast.benchmark.cases import CASES
    from dino_fast.benchmark.harness import run_case
    records = []
    for name in names:
        try:
            case = CASES[name](device, smoke)
        except ImportError as exc:
            records.append({"op": name, "status": "missing", "error": f"{type(exc).__name__}: {exc}"})
            continue
        except Exception as exc:  # noqa: BLE001 -- reported per case, the others still run
            records.append({"op": name, "status": "failed", "error": f"setup: {type(exc).__name__}: {exc}"})
            continue
        try:
            rec = run_case(case, spec, smoke)
            rec["status"] = "ok"
            records.append(rec)
        except Exception as exc:  # noqa: BLE001
            records.append({"op": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def run(args) -> int:
    if args.gpu_check or args.dry_run:
        return _gpu_check(args)
    import torch

    from dino_fast.benchmark.baseline import environment, write_json_atomic
    from dino_fast.benchmark.cases import CASES
    from dino_fast.devices import device_spec, spec_dict
    from dino_fast.plot import bar_chart
    names = list(CASES) if not args.cases else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"dino-fast bench: --cases: unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    spec = device_spec(device)
    if not args.json:
        mode = ("SMOKE MODE: no GPU, tiny shapes; correctness is checked, the timings mean nothing"
                if device.type != "cuda" else ("smoke shapes" if smoke else "full shapes"))
        print(f"dino-fast bench on {spec.name} ({spec.kind}; peaks {spec.hbm_gbps:.0f} GB/s, "
              f"{spec.bf16_tflops:.0f} bf16 TFLOP/s) - {mode}", flush=True)
    records = run_cases(names, device, smoke, spec)
    os.makedirs(args.output, exist_ok=True)
    ok = [r for r in records if r["status"] == "ok"]
    png = os.path.join(args.output, "bench.png")
    bar_chart(png, [r["op"] for r in ok], [r.get("speedup") or 0.0 for r in ok],
              title=f"dino-fast vs reference on {spec.name}{' (smoke)' if smoke else ''}: speed-up (x)",
              unit="x")
    report = {"device": spec_dict(spec), "smoke": smoke, **environment(), "cases": records}
    path = os.path.join(args.output, "bench.json")
    write_json_atomic(path, report)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_table(records))
        print(f"wrote {path} and {png}")
    bad = [r for r in records if r["status"] != "ok"]
    for r in bad:
        print(f"dino-fast bench: {r['op']} {r['status']}: {r['error']}", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in bad) else 0


def _gpu_check(args) -> int:
    if not args.gpu_check:
        print("dino-fast bench: --dry-run goes with --gpu-check", file=sys.stderr)
        return 2
    if not args.time_budget > 0:
        print(f"dino-fast bench: --time-budget must be > 0 seconds, got {args.time_budget}", file=sys.stderr)
        return 2
    from dino_fast.gpu_check import dry_run, run_check
    from dino_fast.gpu_check.plan import GpuCheckError
    try:
        if args.dry_run:
            return dry_run(args.time_budget, as_json=args.json, echo=print)
        return run_check(args.time_budget, workdir=os.path.join(args.output, "gpu-check"), echo=print)
    except GpuCheckError as exc:
        print(f"dino-fast bench --gpu-check: {exc}", file=sys.stderr)
        return 2
