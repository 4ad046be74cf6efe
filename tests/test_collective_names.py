"""dist_timeout errors name the operation: the DINO centre all-reduce and the FSDP2
collectives of a training step, with gloo and a 3 s process-group timeout, where rank 1
skips the collective rank 0 waits in (2 processes). Messages from the gloo build in use:
"Timed out waiting ... for recv operation", then "Application timeout caused pair
closure" for the next collective."""
from __future__ import annotations

import json
import os
import time

import torch

from dino_fast.runtime.launch import CollectiveError
from dino_fast.runtime.step_collectives import is_collective_failure, step_collective_error
from tests._dist import run_distributed

TIMEOUT_S = 3


def _rank0(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
    except CollectiveError as exc:
        return {"error": str(exc), "operation": exc.operation, "waited": time.monotonic() - t0}
    except RuntimeError as exc:
        named = step_collective_error(exc, it=7)
        return {"raw": str(exc)[:300], "error": str(named) if named else None,
                "operation": named.operation if named else None, "waited": time.monotonic() - t0}
    return {"error": None}


def _worker(rank, world, out_dir):
    from dino_fast.losses.dino_loss import DINOLoss
    from tests.test_default_path import make_state
    from tests.test_grad_accum import fixed_batches
    torch.set_num_threads(1)
    # FSDP2 student (fp32) built on both ranks; sharding itself needs no collective
    st = make_state(dict(precision="fp32", cpu_autocast=False), world, True)
    crops = fixed_batches(1, rank, world)[0]
    loss = DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    if rank == 0:
        # first the FSDP2 all-gathers of a forward (a real 3 s timeout), then the centre all-reduce
        # (gloo has closed the pair after the timeout: it fails at once, still named)
        res = {"fsdp": _rank0(lambda: st.student(crops))}
        res["centre"] = _rank0(lambda: loss.update_center_from_sum(torch.ones(1, 8), 4))
        with open(os.path.join(out_dir, "rank0.json"), "w") as f:
            json.dump(res, f)
    else:
        time.sleep(2 * TIMEOUT_S + 4)    # alive but never joining: rank 0 must time out, not see a crash
    os._exit(0)                          # the group is unusable after a timeout: no teardown barrier


def test_timeouts_name_the_operation(tmp_path):
    run_distributed(_worker, str(tmp_path), world_size=2, timeout_s=TIMEOUT_S)
    res = json.load(open(tmp_path / "rank0.json"))
    centre, fsdp = res["centre"], res["fsdp"]
    assert centre["operation"] == "all_reduce DINO centre", centre
    assert "rank 0/2: collective 'all_reduce DINO centre' timed out" in centre["error"], centre
    assert fsdp["operation"] and fsdp["operation"].startswith("FSDP2 all-gather / reduce-scatter"), fsdp
    assert "at iteration 7" in fsdp["error"] and "--dist_timeout" in fsdp["error"], fsdp
    assert fsdp["waited"] >= TIMEOUT_S - 0.5, res


def test_other_step_errors_are_not_renamed():
    assert step_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 3) is None
    assert step_collective_error(torch.OutOfMemoryError("CUDA out of memory. gloo"), 3) is None
    named = CollectiveError("collective 'all_reduce DINO centre' timed out ... gloo", "all_reduce DINO centre", 0)
    assert step_collective_error(named, 3) is None                 # already named: passes through
    assert is_collective_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                              "Connection closed by peer [127.0.0.1]:1234"))
