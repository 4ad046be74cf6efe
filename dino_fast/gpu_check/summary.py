"""The gpu-check's results: bench/results/<device>.json (the benches' baseline, the same file
`pytest bench/ --save-baseline` writes and tools/bench_table.py reads, with a "gpu_check"
section added) and a short markdown summary bench/results/<device>.md. Both written
atomically (temp file, then os.replace).

    "gpu_check": {"budget_s", "elapsed_s", "optional": {"xformers": version | null, ...},
                  "parts": [{name, what, status, seconds, budget_s, exit_code, counts, note}],
                  "tests": [{nodeid, part, outcome, reason, duration_s}],
                  "figures": [{nodeid, ...}],       # record_property("gpu_check_figures", {...})
                  "collection_skips": [...], "unmarked": [...]}
"""
from __future__ import annotations

import os
import tempfile

from dino_fast.benchmark import baseline as bench_baseline

FIGURES_KEY = "gpu_check_figures"     # a GPU test's record_property key for numbers to report
FOLDED_PARTS = ("kernel_suites", "benches")   # the markdown lists only their tests that did not pass


def optional_packages() -> dict:
    """Versions of the optional GPU packages (None: not installed) and whether this torch has
    the varlen flash attention."""
    out: dict = {}
    for key, module in (("xformers", "xformers"), ("nvidia.dali", "nvidia.dali")):
        try:
            mod = __import__(module, fromlist=["__version__"])
            out[key] = str(getattr(mod, "__version__", "installed"))
        except Exception:  # noqa: BLE001 -- a broken optional package counts as absent
            out[key] = None
    try:
        from dino_fast.model.attention import has_varlen
        out["flash_varlen"] = bool(has_varlen())
    except Exception:  # noqa: BLE001
        out["flash_varlen"] = None
    return out


def build_report(parts, plan, elapsed_s: float, optional: dict | None = None,
                 budget_s: float | None = None) -> tuple[dict, dict]:
    """(the "gpu_check" section, the bench cases {name: record}) from the part results;
    budget_s: the whole check's (default: the plan's, what the parts had)."""
    tests, figures, cases = [], [], {}
    for p in parts:
        for t in p.tests:
            if p.name == "benches":
                if t.get("bench"):
                    cases[bench_baseline.case_name(t["nodeid"])] = t["bench"]
                if t["outcome"] == "passed" and not t.get("bench"):
                    continue       # a bench with no record (e.g. a helper test): nothing to report
            else:
                props = t.get("properties") or {}
                if isinstance(props.get(FIGURES_KEY), dict):
                    figures.append({"nodeid": t["nodeid"], **props[FIGURES_KEY]})
            tests.append({"nodeid": t["nodeid"], "part": p.name, "outcome": t["outcome"],
                          "reason": t.get("reason", ""), "duration_s": t.get("duration_s")})
    section = {
        "budget_s": plan.budget_s if budget_s is None else budget_s, "elapsed_s": round(elapsed_s, 1), "optional": optional or {},
        "parts": [{"name": p.name, "what": p.what, "status": p.status, "seconds": p.seconds,
                   "budget_s": round(p.budget_s, 1), "exit_code": p.exit_code, "counts": p.counts(),
                   "note": p.note} for p in parts],
        "tests": tests, "figures": figures,
        "collection_skips": plan.collection_skips, "unmarked": plan.unmarked,
    }
    return section, cases


def write_text_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_results(results_dir: str, device_kind: str, device_name: str, section: dict,
                  cases: dict[str, dict]) -> tuple[str, str]:
    """Merge `cases` into bench/results/<device>.json (the baseline; bench_baseline.save),
    add the "gpu_check" section, write the markdown beside it. Returns both paths."""
    path = bench_baseline.results_path(results_dir, device_kind)
    data = bench_baseline.save(path, device_kind, device_name, cases, smoke=False)
    data["gpu_check"] = section
    bench_baseline.write_json_atomic(path, data)
    md = os.path.join(results_dir, f"{device_kind}.md")
    write_text_atomic(md, render_markdown(data))
    return path, md


# --------------------------------------------------------------------------- markdown
def _num(v, fmt="{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def figure_rows(cases: dict[str, dict]) -> list[str]:
    """One table row per bench case: ms, reference ms, x reference, achieved, % of the
    hardware limit and what that limit counts."""
    rows = ["| case | ms | reference ms | × reference | achieved | % of hardware limit | limit |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, rec in sorted(cases.items()):
        if "gbps" in rec:
            rate, frac = f"{rec['gbps']:.0f} GB/s", rec.get("frac_hbm")
            limit = f"HBM peak ({rec['floor']})" if rec.get("floor") else "HBM peak"
        elif "tflops" in rec:
            rate, frac, limit = f"{rec['tflops']:.1f} TFLOP/s", rec.get("mfu"), "bf16 dense peak (MFU)"
        else:
            rate, frac, limit = "–", None, "–"
        ratio = "–" if rec.get("speedup") is None else f"{rec['speedup']:.2f}× {rec.get('ref_name') or ''}".strip()
        rows.append(f"| `{_cell(name)}` | {_num(rec.get('ms'))} | {_num(rec.get('ref_ms'))} | {_cell(ratio)} | "
                    f"{rate} | {_num(None if frac is None else 100 * frac, '{:.1f}')} | {_cell(limit)} |")
    return rows


def render_markdown(data: dict) -> str:
    """The short summary of one device's results file (with its "gpu_check" section)."""
    g = data.get("gpu_check") or {}
    v = data.get("versions", {})
    opt = g.get("optional", {})
    lines = [f"# GPU check: {data.get('device_name', data['device'])} (`{data['device']}`)", "",
             f"`dino-fast bench --gpu-check` on {data.get('date', '?')}, commit `{data.get('commit', '?')}`; "
             f"torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, CUDA {v.get('cuda', '?')}; "
             f"xformers {opt.get('xformers') or 'not installed'}, DALI {opt.get('nvidia.dali') or 'not installed'}, "
             f"flash varlen {'yes' if opt.get('flash_varlen') else 'no'}. "
             f"{_num(g.get('elapsed_s'), '{:.0f}')} s of a {_num(g.get('budget_s'), '{:.0f}')} s budget.", "",
             "## Parts", "",
             "| part | status | passed | failed | skipped | other | s | budget s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in g.get("parts", []):
        c = dict(p.get("counts", {}))
        other = sum(n for k, n in c.items() if k not in ("passed", "failed", "skipped"))
        status = p["status"].upper() if p["status"] in ("failed", "timed out") else p["status"]
        lines.append(f"| {p['name']} | {status}{' – ' + _cell(p['note']) if p.get('note') else ''} | "
                     f"{c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('skipped', 0)} | {other} | "
                     f"{_num(p.get('seconds'), '{:.0f}')} | {_num(p.get('budget_s'), '{:.0f}')} |")
    lines += ["", "## Figures (benches: ratio to the reference and to the hardware limit)", ""]
    cases = data.get("cases", {})
    lines += figure_rows(cases) if cases else ["No bench case finished."]
    if g.get("figures"):
        lines += ["", "## Figures from the GPU tests", ""]
        for f in g["figures"]:
            vals = ", ".join(f"{k} {_num(x) if isinstance(x, float) else x}" for k, x in f.items() if k != "nodeid")
            lines.append(f"- `{_cell(f['nodeid'])}`: {_cell(vals)}")
    lines += ["", "## GPU tests", "", "| test | part | outcome | why |", "|---|---|---|---|"]
    folded: dict[str, int] = {}
    for t in g.get("tests", []):
        if t["part"] in FOLDED_PARTS and t["outcome"] == "passed":
            folded[t["part"]] = folded.get(t["part"], 0) + 1
            continue            # counted below (benches: their figures are above)
        out = t["outcome"] if t["outcome"] in ("passed", "skipped", "xfailed") else t["outcome"].upper()
        lines.append(f"| `{_cell(t['nodeid'])}` | {t['part']} | {out} | {_cell(t.get('reason') or '')} |")
    for part, n in folded.items():
        lines.append(f"| {n} more in {part} | {part} | passed | |")
    if g.get("collection_skips"):
        lines += ["", "Modules that did not collect:", ""]
        lines += [f"- `{_cell(s['nodeid'])}`: {s['outcome']}: {_cell(s.get('reason', ''))}"
                  for s in g["collection_skips"]]
    if g.get("unmarked"):
        lines += ["", "GPU-only tests without the `gpu` marker (ran in `other`): "
                  + ", ".join(f"`{n}`" for n in g["unmarked"])]
    return "\n".join(lines) + "\n"
