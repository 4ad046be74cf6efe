"""The package installs under one namespace: `kernels/` as dino_fast.kernels,
`pipelines/` as dino_fast.pipelines, in an editable install and in a wheel."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, pythonpath: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_editable_install_maps_namespaces(tmp_path):
    # From outside the repo, the mapped packages resolve to the repo folders.
    out = _python("import dino_fast.kernels.spec as k, dino_fast.pipelines as p;"
                  "print(k.__file__); print(p.__file__)", cwd=tmp_path)
    kfile, pfile = out.splitlines()
    assert Path(kfile) == ROOT / "kernels" / "spec.py"
    assert Path(pfile) == ROOT / "pipelines" / "__init__.py"


def test_console_script_declared():
    text = (ROOT / "setup.py").read_text()
    assert "dino-fast=dino_fast.cli:main" in text
    from dino_fast.cli import main
    assert main(["--help"]) == 0


def test_wheel_contains_and_imports_mapped_packages(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(wheels), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("dino_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dino_fast/kernels/spec.py" in names
    assert "dino_fast/pipelines/__init__.py" in names
    assert "dino_fast/cli.py" in names
    assert not any(n.startswith(("kernels/", "pipelines/", "tests/", "bench/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    ep = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dino-fast = dino_fast.cli:main" in ep
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = _python("import dino_fast, dino_fast.kernels.spec as k, dino_fast.pipelines as p;"
                  "print(dino_fast.__file__); print(k.__file__)", cwd=tmp_path, pythonpath=str(site))
    for line in out.splitlines():
        assert Path(line).is_relative_to(site), line
