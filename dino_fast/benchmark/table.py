"""Regenerate the README's performance tables from the committed results.

Reads bench/results/<device>.json (written by `pytest bench/ --save-baseline`
on a GPU; smoke results are ignored) and bench/results/kernels_sm90.json
(written by `dino-fast kernels --arch sm_90 --output bench/results`), and
rewrites only the block between `<!-- bench-table:start -->` and
`<!-- bench-table:end -->` in README.md. Nothing is typed by hand.

    python tools/bench_table.py            # rewrite README.md
    python tools/bench_table.py --check    # exit 1 when README.md is out of date

(tools/bench_table.py runs `main` here.)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

from dino_fast.benchmark.baseline import RESULTS_DIR, ROOT
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
DEVICE_ORDER = ("h100", "h200", "a100")


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def device_results(results_dir: str) -> list[dict]:
    """Committed GPU baselines, H100 then H200 then A100 then the rest."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            data = _load(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: unreadable ({exc}); fix or delete it")
        if isinstance(data, dict) and "cases" in data and "device" in data and not data.get("smoke"):
            out.append(data)
    rank = {d: i for i, d in enumerate(DEVICE_ORDER)}
    return sorted(out, key=lambda d: (rank.get(d["device"], len(rank)), d["device"]))


def _num(v, fmt="{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def device_table(data: dict) -> str:
    v = data.get("versions", {})
    lines = [f"**{data.get('device_name', data['device'])}** — {data.get('date', '?')[:10]}, commit "
             f"`{data.get('commit', '?')}`, torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, "
             f"CUDA {v.get('cuda', '?')}", "",
             "| case | ms | vs reference | achieved | % of peak |", "|---|---:|---:|---:|---:|"]
    if data.get("gpu_check"):
        lines[1:1] = ["", gpu_check_line(data)]
    for name, rec in sorted(data["cases"].items()):
        if "gbps" in rec:
            rate, frac = f"{rec['gbps']:.0f} GB/s", rec.get("frac_hbm")
        elif "tflops" in rec:
            rate, frac = f"{rec['tflops']:.1f} TFLOP/s", rec.get("mfu")
        else:
            rate, frac = "–", None
        ratio = "–" if rec.get("speedup") is None else f"{rec['speedup']:.2f}× {rec.get('ref_name') or ''}".strip()
        lines.append(f"| `{name}` | {_num(rec.get('ms'))} | {ratio} | {rate} | "
                     f"{_num(None if frac is None else 100 * frac, '{:.0f}')} |")
    return "\n".join(lines)


def gpu_check_line(data: dict) -> str:
    """One line on the `dino-fast bench --gpu-check` run behind a device's results."""
    g = data["gpu_check"]
    counts: dict[str, int] = {}
    for t in g.get("tests", []):
        if t.get("part") != "benches":
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    bad = [p["name"] for p in g.get("parts", []) if p.get("status") in ("failed", "timed out")]
    md = f"bench/results/{data['device']}.md"
    return ("`dino-fast bench --gpu-check`: GPU tests " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + (f"; parts not passed: {', '.join(bad)}" if bad else "; every part passed")
            + f" ([{md}]({md}))")


def kernels_table(data: dict) -> str:
    """One line per (kernel, dtype): ranges over its configurations."""
    groups: dict[tuple, list[dict]] = {}
    for r in data["rows"]:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)

    def rng(vals):
        vals = [x for x in vals if x is not None]
        if not vals:
            return "–"
        lo, hi = min(vals), max(vals)
        return str(lo) if lo == hi else f"{lo}–{hi}"
    lines = [f"`dino-fast kernels --arch {data['arch']}` (ptxas `{data.get('ptxas_gpu_name')}`, triton "
             f"{data.get('triton')}, commit `{data.get('commit')}`; occupancy for the "
             f"{data.get('occupancy_device')}, {data.get('sms')} SMs; full table: "
             f"[bench/results/kernels_{data['arch'].replace('_', '')}.md]"
             f"(bench/results/kernels_{data['arch'].replace('_', '')}.md))", "",
             "| kernel | dtype | configs | regs/thread | spill B | smem B | blocks/SM | waves |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (kernel, dtype), rows in sorted(groups.items()):
        failed = sum(not r["ok"] for r in rows)
        ok = [r for r in rows if r["ok"]]
        lines.append(f"| {kernel} | {dtype} | {len(rows)}{f' ({failed} FAILED)' if failed else ''} | "
                     f"{rng([r['regs'] for r in ok])} | {rng([r['spill_bytes'] for r in ok])} | "
                     f"{rng([r['smem_bytes'] for r in ok])} | {rng([r['blocks_per_sm'] for r in ok])} | "
                     f"{rng([r['waves'] for r in ok])} |")
    return "\n".join(lines)


def render(results_dir: str) -> str:
    parts = ["<!-- generated by tools/bench_table.py from bench/results/; do not edit by hand -->", ""]
    devices = device_results(results_dir)
    if devices:
        parts += ["#### Measured (`pytest bench/ --save-baseline`)", ""]
        for d in devices:
            parts += [device_table(d), ""]
    else:
        parts += ["No GPU results committed yet: run `pytest bench/ --save-baseline` on an H100 or H200 "
                  "and commit `bench/results/<device>.json`.", ""]
    kpath = os.path.join(results_dir, "kernels_sm90.json")
    if os.path.exists(kpath):
        parts += ["#### Kernels compiled for sm_90 (no GPU needed)", "", kernels_table(_load(kpath)), ""]
    return "\n".join(parts)


def replace_block(text: str, block: str, path: str = "README.md") -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path}: needs exactly one '{START}' followed by one '{END}' line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench_table.py", description=__doc__.splitlines()[0])
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--results", default=RESULTS_DIR)
    p.add_argument("--check", action="store_true", help="exit 1 if the README block is out of date")
    a = p.parse_args(argv)
    with open(a.readme, encoding="utf-8") as f:
        text = f.read()
    new = replace_block(text, render(a.results), a.readme)
    if a.check:
        if new != text:
            print(f"{a.readme}: performance tables are out of date; run python tools/bench_table.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(a.readme)), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, a.readme)
    print(f"{a.readme}: performance block {'updated' if new != text else 'already up to date'}")
    return 0
