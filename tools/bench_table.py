#!/usr/bin/env python
"""Regenerate the README's performance tables from the committed results
(`--check`: exit 1 when README.md is out of date). The logic is
dino_fast.benchmark.table; this script also runs from a clone without an install."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dino_fast.benchmark.table import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
