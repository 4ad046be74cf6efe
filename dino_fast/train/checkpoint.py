"""Checkpoints: the reference layout, written atomically, sharded under FSDP2.

Layout (the reference's keys, so eval_knn / eval_linear / visualize_attention
read them): student, teacher, optimizer, epoch (epochs completed), args,
dino_loss (the centre), fp16_scaler; plus dino-fast's own: `it` (the next
global iteration = the schedules' position), `data` (epoch and step to resume
the loader at), `rng` (torch, CUDA, numpy and Python states) and `world_size`.
Everything is tensors, numbers, strings and containers, so
`torch.load(..., weights_only=True)` can read it.

Files in output_dir:
  single process : checkpoint.pth (+ checkpoint{epoch:04}.pth every saveckp_freq epochs)
  FSDP2          : checkpoint/ (torch.distributed.checkpoint, one shard file per rank, so
                   a run resumes on any world size) (+ checkpoint{epoch:04}/)
Atomic: a file is written to `<name>.tmp.<pid>` and renamed with os.replace; a
directory is written to `<name>.tmp/`, the old one moved to `<name>.old/`, the
new one renamed in, the old one removed. A kill at any moment leaves a
complete checkpoint (`<name>` or, between the two renames, `<name>.old`).
The periodic copy is made (atomically, from the temp) before the main
checkpoint is replaced, so a kill can leave a copy of an epoch the resume
redoes but never a missing copy; the temp files a kill leaves are removed at
the next start (stale.py).
"""
from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

FILE, DIR = "checkpoint.pth", "checkpoint"


# ---- small pieces ---------------------------------------------------------------------------
def atomic_torch_save(obj, path: str, copy_to: str | None = None) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`; `copy_to`
    also gets the file (atomically, before `path` is replaced, so a kill in between leaves the
    copy of an epoch that the resume redoes, never a missing copy)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if copy_to:
        atomic_copy(tmp, copy_to)
    os.replace(tmp, path)


def atomic_copy(src: str, dst: str) -> None:
    """Copy a file or a folder to `dst` through `dst.tmp.<pid>` and a rename."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    if os.path.isdir(src):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
    else:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def find(output_dir: str) -> str | None:
    """The checkpoint to resume from: checkpoint/ (sharded), else checkpoint.pth, else a
    checkpoint.old/ left by a kill between two renames; None when there is none."""
    for name in (DIR, FILE, DIR + ".old"):
        path = os.path.join(output_dir, name)
        if (name.endswith(".pth") and os.path.isfile(path)) or (
                not name.endswith(".pth") and os.path.isfile(os.path.join(path, ".metadata"))):
            return path
    return None


# ---- state dicts ----------------------------------------------------------------------------
def _state(st, *, epoch: int, it: int, args: dict, world_size: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    out = {
        "student": get_model_state_dict(st.student),
        "teacher": get_model_state_dict(st.teacher),
        "optimizer": get_optimizer_state_dict(st.student, st.optimizer),
        "epoch": epoch,
        "args": args,
        "dino_loss": {k: v.detach().clone() for k, v in st.dino_loss.state_dict().items()},
        "it": it,
        "data": {"epoch": epoch, "step_in_epoch": 0},
        "world_size": world_size,
    }
    if st.scaler is not None:
        out["fp16_scaler"] = st.scaler.state_dict()
    return out


def save(output_dir: str, st, *, epoch: int, it: int, args: dict, world_size: int, use_fsdp: bool,
         keep_copy: bool = False) -> str:
    """Write the checkpoint after `epoch` completed epochs; `keep_copy` also keeps
    checkpoint{epoch-1:04} (the reference names the copy by the 0-based epoch just trained)."""
    state = _state(st, epoch=epoch, it=it, args=args, world_size=world_size)
    copy_name = f"checkpoint{epoch - 1:04}"
    if not use_fsdp:
        state["rng"] = rng_state()
        path = os.path.join(output_dir, FILE)
        atomic_torch_save(state, path, copy_to=os.path.join(output_dir, copy_name + ".pth") if keep_copy else None)
        return path
    return _save_sharded(output_dir, state, copy_name if keep_copy else None)


def _save_sharded(output_dir: str, state: dict, copy_name: str | None) -> str:
    import torch.distributed.checkpoint as dcp
    final, tmp, old = (os.path.join(output_dir, DIR + s) for s in ("", ".tmp", ".old"))
    if _rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    _barrier()
    dcp.save(state, checkpoint_id=tmp)
    atomic_torch_save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        if copy_name:  # the copy first (atomically): a kill before the renames redoes this epoch
            atomic_copy(tmp, os.path.join(output_dir, copy_name))
        if os.path.exists(final):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if os.path.exists(old):
            shutil.rmtree(old)
    _barrier()
    return final


def load(path: str, st, *, world_size: int, use_fsdp: bool) -> dict:
    """Restore student, teacher, optimizer, centre, scaler and (same world size) RNG from
    `path`; returns {"epoch", "it", "data"} to continue from."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    if os.path.isdir(path):
        import torch.distributed.checkpoint as dcp
        state = _state(st, epoch=0, it=0, args={}, world_size=0)
        from torch.distributed.checkpoint import DefaultLoadPlanner
        # partial: a last layer still frozen at save time has no optimizer state in the checkpoint
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        # drop the placeholder states (made by a zero-lr step when the template was built) of
        # parameters the checkpoint has no state for, so they start fresh as in the original run
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        prefixes = {k.rsplit(".", 1)[0] for k in saved if k.startswith("optimizer.state.")}
        state["optimizer"]["state"] = {fqn: v for fqn, v in state["optimizer"]["state"].items()
                                       if f"optimizer.state.{fqn}" in prefixes}
        options = StateDictOptions()
        optim_options = StateDictOptions(strict=False)
        rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")
        rng = torch.load(rng_path, weights_only=False) if os.path.isfile(rng_path) else None
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = [k for k in ("student", "teacher", "optimizer", "epoch", "dino_loss") if k not in state]
        if missing:
            raise ValueError(f"{path}: not a dino-fast/reference training checkpoint (missing {missing}); "
                             "remove it or choose another --output_dir")
        options = StateDictOptions(full_state_dict=use_fsdp)
        optim_options = StateDictOptions(full_state_dict=use_fsdp, strict=False)
        rng = state.get("rng")
    set_model_state_dict(st.student, state["student"], options=options)
    set_model_state_dict(st.teacher, state["teacher"], options=options)
    # strict=False: a frozen last layer (freeze_last_layer) has no optimizer state yet, as in the reference
    set_optimizer_state_dict(st.student, st.optimizer, state["optimizer"], options=optim_options)
    st.dino_loss.load_state_dict(state["dino_loss"])
    if st.scaler is not None and "fp16_scaler" in state:
        st.scaler.load_state_dict(state["fp16_scaler"])
    if rng is not None and state.get("world_size", 1) == world_size:
        set_rng_state(rng)
    else:
        log.warning("%s: saved with world size %s, now %d: RNG states not restored (the run continues "
                    "correctly, but not bit-for-bit)", path, state.get("world_size"), world_size)
    epoch = int(state["epoch"])
    return {"epoch": epoch, "it": int(state.get("it", 0)), "data": state.get("data", {"epoch": epoch})}
