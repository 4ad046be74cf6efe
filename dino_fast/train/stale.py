"""Debris of an interrupted run in its output_dir, removed when the next run starts (after the
resume check passed, before anything is written).

An interruption can leave, next to the complete checkpoint it never touches: the temp file of an
atomic write (`checkpoint.pth.tmp.<pid>`, `config.json.tmp.<pid>`, `log.jsonl.tmp.<pid>`, a copy
`checkpoint0001.pth.tmp[.<pid>]`), the temp folder of a sharded save (`checkpoint.tmp/`,
`checkpoint0001.tmp/`) and, after a kill between the two renames of a sharded save, the previous
checkpoint `checkpoint.old/` (removed only when `checkpoint/` is complete: otherwise it is the one to
resume from). Only names the trainer writes are matched; nothing else in the folder is touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil

log = logging.getLogger(__name__)

_TMP = re.compile(r"^(checkpoint\d*(\.pth)?|config\.json|log\.jsonl|loss_curve\.png)\.tmp(\.\d+)?$")


def stale_files(output_dir: str) -> list[str]:
    """Paths of the debris in output_dir (see the module docstring)."""
    if not os.path.isdir(output_dir):
        return []
    out = [os.path.join(output_dir, n) for n in sorted(os.listdir(output_dir)) if _TMP.match(n)]
    old = os.path.join(output_dir, "checkpoint.old")
    if os.path.isdir(old) and os.path.isfile(os.path.join(output_dir, "checkpoint", ".metadata")):
        out.append(old)
    return out


def remove_stale(output_dir: str) -> list[str]:
    """Remove the debris of an interrupted run; returns what was removed (and logs it)."""
    removed = stale_files(output_dir)
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed what an interrupted run left in %s: %s", output_dir,
                 ", ".join(os.path.basename(p) for p in removed))
    return removed
