"""Name the FSDP2 collectives of the training step when one fails.

FSDP2 issues its all-gathers (forward, and again for the blocks in the backward) and
reduce-scatters (backward) from module hooks, so they cannot each be wrapped in
`named_collective`. With gloo (CPU) they are waited on inside the step, and a peer that
never joins makes the step raise a c10d / gloo error after `dist_timeout`; the loop turns
it into the same `CollectiveError` as every named collective, naming "FSDP2 all-gather /
reduce-scatter of the training step" (the other unnamed collective of the step, the
gradient-clip norm all-reduce, is included in the name) and the iteration. With NCCL they run asynchronously
on the GPU: torch's own NCCL watchdog aborts the process after `dist_timeout`, with the
NCCL op (e.g. _ALLGATHER_BASE, _REDUCE_SCATTER_BASE) and its sequence number in its
message; there is no Python exception to rename.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

# what a failed c10d collective looks like when it is not a DistError subclass (older torch, gloo)
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|c10d|ProcessGroup|time(d)?[ _-]?out|pair closure|"
                                 r"connection (closed|reset)", re.IGNORECASE)


def is_collective_failure(exc: BaseException) -> bool:
    """A process-group error (timeout, peer gone), not a bug or an OOM in the step."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return bool(_COLLECTIVE_FAILURE.search(str(exc)))


def step_collective_error(exc: BaseException, it: int):
    """The CollectiveError naming the step's FSDP2 collectives for `exc`, or None when `exc`
    is not a collective failure (the caller re-raises it unchanged)."""
    from .launch import CollectiveError
    if isinstance(exc, CollectiveError) or not is_collective_failure(exc):
        return None           # already named (the centre all-reduce), or not a collective failure
    from .launch import collective_context, collective_error
    name = (f"FSDP2 all-gather / reduce-scatter of the training step (forward, backward; or the "
            f"gradient-clip norm all-reduce) at iteration {it}")
    return collective_error(name, exc, None, *collective_context())


__all__ = ["is_collective_failure", "step_collective_error"]
