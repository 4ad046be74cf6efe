"""The layout's rules, checked on the source: the kernel package imports
nothing from the trainer, no module imports form a cycle, every module
imports on its own, kernels are launched with keyword arguments, and no
file refers to a document that is not in the repository."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package name (setup.py's package_dir)
PACKAGES = {"dino_fast": "dino_fast", "kernels": "dino_fast.kernels", "pipelines": "dino_fast.pipelines"}


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the three folders."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported dino_fast module, line) for every import in the file, top-level or inside a
    function (a lazy import still runs), except `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:        # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return [(m, line) for m, line in out if m == "dino_fast" or m.startswith("dino_fast.")]


def test_the_module_list_covers_the_tree():
    assert "dino_fast.kernels.dino_loss" in MODULES and "dino_fast.losses.dino_loss" in MODULES
    assert "dino_fast.pipelines.loader" in MODULES and "dino_fast.train.step" in MODULES


def test_kernel_package_imports_nothing_from_the_trainer():
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {mod}"
           for name in MODULES if name.startswith("dino_fast.kernels")
           for mod, line in _imports(name, MODULES[name])
           if not (mod == "dino_fast.kernels" or mod.startswith("dino_fast.kernels."))]
    assert bad == [], "kernels/ must import only dino_fast.kernels:\n" + "\n".join(bad)


def test_kernel_modules_import_with_the_trainer_unavailable():
    # every dino_fast module outside the kernel package is made unimportable
    poisoned = sorted(m for m in MODULES if m != "dino_fast" and not m.startswith("dino_fast.kernels"))
    kernels = sorted(m for m in MODULES if m.startswith("dino_fast.kernels"))
    code = ("import sys\n"
            f"for m in {poisoned!r}:\n    sys.modules[m] = None\n"
            f"import importlib\nfor m in {kernels!r}:\n    importlib.import_module(m)\nprint('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _graph() -> dict[str, set[str]]:
    g = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for mod, _ in _imports(name, path):
            if mod in MODULES and mod != name:
                g[name].add(mod)
    return g


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert cycles == [], "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
    # each module first in a clean dino_fast namespace (torch etc. stay loaded): an import that
    # only works after another module was imported first fails here
    names = sorted(m for m in MODULES if m != "dino_fast.data.build_demo_data")
    code = ("import importlib, sys, traceback\nbad = []\n"
            f"for m in {names!r}:\n"
            "    for k in [k for k in sys.modules if k == 'dino_fast' or k.startswith('dino_fast.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad) or 'ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == ["ok"], r.stdout[-3000:] + r.stderr[-3000:]


def test_kernels_are_launched_with_keyword_arguments():
    launches, bad = 0, []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):   # kernel[grid](...)
                launches += 1
                if node.args:
                    bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)} gets "
                               f"{len(node.args)} positional argument(s)")
    assert launches >= 7, launches          # 6 DINO loss kernels + the EMA kernel
    assert bad == [], "\n".join(bad)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    keep = (".py", ".md", ".ini", ".toml", ".cfg", ".txt", ".json")
    return [ROOT / p for p in out if p.endswith(keep) or p == ".ci/run"]


_OUTSIDE_DOCS = re.compile(r"DESIGN\.md|STYLE\.md|design doc|\bissue\s*#?\d+", re.IGNORECASE)


@pytest.mark.parametrize("text,found", [("see DESIGN.md", True), ("(issue 8)", True), ("Issue #12:", True),
                                        ("the issues of a run", False), ("designed for", False)])
def test_outside_document_pattern(text, found):
    assert bool(_OUTSIDE_DOCS.search(text)) is found


def test_no_reference_to_documents_outside_the_repository():
    me = Path(__file__).resolve()
    bad = []
    for path in _tracked_text_files():
        if path == me or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE_DOCS.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert bad == [], "references to documents not in the repository:\n" + "\n".join(bad)


def test_the_step_loss_protocol_is_what_the_loss_module_has():
    from dino_fast.kernels.dino_loss_reference import DINOLossReference
    from dino_fast.losses.dino_loss import DINOLoss
    from dino_fast.train.step import StepLoss
    assert isinstance(DINOLoss(8, 4, 0.04, 0.04, 0, 1), StepLoss)
    # the reference module lacks update_center_from_sum / last_teacher_sum: not a StepLoss
    assert not isinstance(DINOLossReference(8, 4, 0.04, 0.04, 0, 1), StepLoss)
