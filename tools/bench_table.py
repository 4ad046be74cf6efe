#!/usr/bin/env python
"""Regenerate the README's performance tables from the committed results
(`--check`: exit 1 when README.md is out of date). The logic is
dino_fast.benchmark.table."""
import sys

from dino_fast.benchmark.table import main

if __name__ == "__main__":
    sys.exit(main())
