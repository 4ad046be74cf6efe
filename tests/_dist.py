"""Run a function in N processes with the gloo backend on CPU (FSDP2,
all-reduce tests). The function must be importable (defined at module level)."""
from __future__ import annotations

import datetime
import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, timeout_s=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **kw)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while a peer still has work in flight
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Success: leave without the interpreter's teardown, where a still-joinable
    # gloo/FSDP helper thread can abort the process ("terminate called without
    # an active exception") after all the work is done and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, *args, world_size: int = 2, timeout_s: float | None = None) -> None:
    """Spawn `world_size` gloo processes running `fn(rank, world_size, *args)`.
    Results travel back through files the caller passes in `args` (e.g. a
    tmp_path); an exception in any rank fails the call. `timeout_s`: the process
    group's collective timeout (default torch's)."""
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args, timeout_s), nprocs=world_size, join=True)
