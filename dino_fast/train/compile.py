"""torch.compile of the student and teacher: per transformer block, or the whole model.

`--compile blocks` (DINOv3's choice): each block's `forward` is replaced by its compiled version
in place, after `fully_shard`, so each graph is exactly the body of one FSDP2 unit: the unit's
all-gather / reshard hooks run eagerly around it, parameter names and the state dict are
unchanged, and activation checkpointing (inside Block.forward) is traced with it. One graph
serves the whole packed sequence (global and local crops in one (T, D) stream), so there is no
recompile across crop sizes; the layout (Python ints) is a static input. Blocks of one model
share the code object: one graph per distinct (shapes, drop rate, mode), all within the
recompile limit raised here. `dynamic=False`: the shapes of a run do not change.

`--compile model`: `nn.Module.compile()` on student and teacher (the old `--compile true`).

`--cuda_graph_teacher`: the teacher's blocks are compiled with inductor's CUDA graphs
(`triton.cudagraphs`, fullgraph, static shapes), as DINOv3's `wrap_compile_block`; the step
marks each new step (`torch.compiler.cudagraph_mark_step_begin`) before the teacher forward.

`CompileMonitor` reads torch._dynamo's counters (graphs compiled, graph breaks and their
reasons) so the loop can log how many graphs each epoch compiled: after the first steps of a
run a non-zero count is a recompile, and is logged as a warning.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from torch import nn

log = logging.getLogger(__name__)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The per-block units of a MultiCropWrapper / backbone (a convnet's FSDP units)."""
    backbone = getattr(model, "backbone", model)
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    from dino_fast.model.convnet import fsdp_units
    return list(fsdp_units(backbone))


def _raise_recompile_limit(n_blocks: int) -> None:
    import torch._dynamo.config as dc
    need = 4 * n_blocks + 16   # one entry per (block drop rate, train / eval, layout), student + teacher
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name) and getattr(dc, name) < need:
            setattr(dc, name, need)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name) and getattr(dc, name) < 8 * need:
            setattr(dc, name, 8 * need)


def compile_blocks(model: nn.Module, *, backend: str | None = None, cuda_graphs: bool = False) -> int:
    """Compile each block's forward in place; returns the number of blocks compiled."""
    blocks = transformer_blocks(model)
    _raise_recompile_limit(len(blocks))
    kw = dict(dynamic=False)
    if backend is not None:
        kw["backend"] = backend
    if cuda_graphs:
        kw.update(fullgraph=True, options={"triton.cudagraphs": True})
    for blk in blocks:
        if getattr(blk, "_dino_fast_compiled", False):
            continue
        blk.forward = torch.compile(blk.forward, **kw)
        blk._dino_fast_compiled = True
    return len(blocks)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def check_device(cfg, device: torch.device) -> None:
    """Options that need a CUDA device, checked once the device is known."""
    from .config import ConfigError
    if getattr(cfg, "cuda_graph_teacher", False) and device.type != "cuda":
        raise ConfigError(f"--cuda_graph_teacher needs a CUDA GPU (this run is on {device.type}): "
                          "drop the flag, or run on a GPU")


def apply_compile(cfg, student: nn.Module, teacher: nn.Module, device: torch.device,
                  backend: str | None = None) -> tuple[nn.Module, nn.Module]:
    """--compile false | blocks | model and --cuda_graph_teacher on prepared (sharded) models."""
    from .step_options import compile_mode
    check_device(cfg, device)
    mode = compile_mode(cfg.compile)
    graphs = bool(getattr(cfg, "cuda_graph_teacher", False))
    if graphs and _is_fsdp(teacher):
        log.warning("--cuda_graph_teacher under FSDP2: a graph is re-recorded whenever an all-gather puts the "
                    "teacher's parameters at new addresses; measure it against --compile blocks")
    if mode == "model":
        kw = {} if backend is None else {"backend": backend}
        student.compile(**kw)
        if graphs:
            compile_blocks(teacher, backend=backend, cuda_graphs=True)
        else:
            teacher.compile(**kw)
    elif mode == "blocks" or graphs:
        if mode == "blocks":
            compile_blocks(student, backend=backend)
        compile_blocks(teacher, backend=backend, cuda_graphs=graphs)
    if mode or graphs:
        log.info("torch.compile: %s%s", {"blocks": "per transformer block", "model": "whole student and teacher",
                                         False: "student eager"}[mode],
                 ", teacher blocks with CUDA graphs" if graphs else "")
    return student, teacher


def mark_step(cfg) -> None:
    """Before the teacher forward of a step: a new CUDA-graph generation (--cuda_graph_teacher)."""
    if getattr(cfg, "cuda_graph_teacher", False):
        torch.compiler.cudagraph_mark_step_begin()


class CompileMonitor:
    """torch._dynamo counters since the last `read`: graphs compiled, graph breaks (by reason)."""

    def __init__(self):
        self._last = self._snapshot()
        self.t0 = time.perf_counter()

    @staticmethod
    def _snapshot() -> tuple[int, Counter]:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"]), Counter(dict(counters["graph_break"]))

    def read(self) -> dict:
        """{"graphs": new graphs, "graph_breaks": new breaks, "break_reasons": {reason: n}}."""
        graphs, breaks = self._snapshot()
        new_breaks = breaks - self._last[1]
        out = {"graphs": graphs - self._last[0], "graph_breaks": sum(new_breaks.values()),
               "break_reasons": dict(new_breaks)}
        self._last = (graphs, breaks)
        return out

    def log_epoch(self, epoch: int, first: bool) -> dict:
        """Log this epoch's compiles: info for the first epoch of a run, a warning (recompiles) later."""
        r = self.read()
        if r["graphs"] or r["graph_breaks"]:
            msg = "epoch %d: torch.compile built %d graph(s), %d graph break(s)%s"
            args = (epoch + 1, r["graphs"], r["graph_breaks"],
                    "" if not r["break_reasons"] else f" {r['break_reasons']}")
            (log.info if first else log.warning)(msg + ("" if first else " (recompiles after warm-up)"), *args)
        return r
