"""`dino-fast <command> --help` imports nothing heavy before parsing (torch, timm, DALI,
torchvision, PIL, numpy): the --help time itself is measured in bench/test_cli_help.py."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "timm", "torchvision", "nvidia.dali", "PIL", "numpy", "triton")

_PROBE = f"""
import contextlib, io, json, sys
from dino_fast import cli
out = {{}}
for name in cli.COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            cli.main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0, (name, e.code)
    out[name] = [text.getvalue().count("--help"), [m for m in {HEAVY!r} if m in sys.modules]]
print(json.dumps(out))
"""


def test_help_of_every_command_imports_nothing_heavy():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from dino_fast.cli import COMMANDS
    assert sorted(result) == sorted(COMMANDS)
    assert {name: heavy for name, (_, heavy) in result.items()} == {name: [] for name in COMMANDS}
    assert all(n >= 1 for n, _ in result.values())           # each printed its usage
