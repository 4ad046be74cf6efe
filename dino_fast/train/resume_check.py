"""Resume validation: does the checkpoint in output_dir belong to the run this config describes?

A checkpoint records what its state and schedules depend on (`record`, stored in its
`args["resume"]`, next to the full config in `args`): the model (architecture and every shape
field), the method and its hyperparameters, the global batch (batch_size_per_gpu × world size;
accumulation splits that batch, so it changes nothing), the steps per epoch, the epochs, and the
data (resolved path and image count). `check_resume` compares it with the new config before
anything is written:

- a difference that would change the model or misalign the schedules stops with one line naming
  each field, the old and the new value, and the fixes (`--resume false`, another `--output_dir`,
  or the flags that restore the old values): `ResumeMismatch` (a ConfigError, exit 2);
- safe differences are accepted and listed in `Resume.notes` (the loop logs them): another world
  size with the same global batch (a sharded checkpoint reshards; a full one is sharded on load),
  another accumulation split, the implementation, precision and logging fields below;
- more epochs are accepted only with `--extend_epochs`: the schedules (lr, weight decay, teacher
  momentum and temperature) are then built for the new epoch count, as if the run had been planned
  that long, and training continues at the iteration reached (as the reference does when --epochs
  changes; the lr jumps from the old schedule's value to the new one's at that iteration);
- a finished run re-run raises `RunComplete` (exit 0, nothing written) saying how to train longer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from .config import ConfigError, TrainConfig

# fields that may differ on resume: how the run is executed, observed or resolved, not what it computes
SAFE = {"num_workers", "log_interval", "grad_accum_steps", "precision", "use_fp16", "attention", "loss_impl",
        "ema_impl", "pipeline", "compile", "activation_checkpointing", "device", "fsdp", "dist_timeout",
        "stop_on_collapse", "collapse_patience", "monitor_knn", "monitor_every", "knn_eval", "dry_run",
        "gpu_memory", "output_dir", "resume", "preset", "extend_epochs"}
# compared through the record instead of field by field
DERIVED = {"batch_size_per_gpu", "data_path", "max_images", "epochs"}
# said when they differ (the rest of SAFE changes nothing a person would ask about)
SAID = ("grad_accum_steps", "precision", "num_workers", "log_interval", "attention", "loss_impl", "ema_impl",
        "pipeline", "compile", "activation_checkpointing", "fsdp")


class ResumeMismatch(ConfigError):
    """The checkpoint in output_dir is of another run; the message names the fields and the fixes."""


class RunComplete(Exception):
    """The run in output_dir already trained all its epochs; the message says how to train longer."""


@dataclass
class Resume:
    path: str                     # the checkpoint to load
    epoch: int                    # epochs completed
    it: int                       # the next global iteration
    notes: list[str] = field(default_factory=list)   # accepted differences, for the log


def data_identity(data_path: str) -> str:
    return data_path if data_path == "demo" else os.path.realpath(data_path)


def steps_per_epoch(n_images: int, world_size: int, batch_size_per_gpu: int) -> int:
    """drop_last on both the rank split and the batches (pipelines.sampling)."""
    return (n_images // world_size) // batch_size_per_gpu


def record(cfg: TrainConfig, world_size: int, n_images: int) -> dict:
    """What the checkpoint's state and schedules depend on beyond the config fields."""
    return {"global_batch": cfg.batch_size_per_gpu * world_size, "world_size": world_size,
            "batch_size_per_gpu": cfg.batch_size_per_gpu, "n_images": int(n_images),
            "data": data_identity(cfg.data_path),
            "steps_per_epoch": steps_per_epoch(n_images, world_size, cfg.batch_size_per_gpu),
            "epochs": cfg.epochs}


def read_saved(path: str) -> dict:
    """{"args", "epoch", "it", "world_size"} of a checkpoint, without reading its tensors
    (a file is memory-mapped; of a sharded checkpoint only the non-tensor entries are loaded)."""
    import torch
    if os.path.isdir(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata
        md = dcp.FileSystemReader(path).read_metadata()
        state: dict = {}
        for key, meta in md.state_dict_metadata.items():
            keys = md.planner_data.get(key, (key,))
            if isinstance(meta, BytesStorageMetadata) and keys[0] in ("args", "epoch", "it", "world_size"):
                node = state
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = None
        dcp.load(state, checkpoint_id=path, no_dist=True)
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ResumeMismatch(f"{path}: not a dino-fast training checkpoint; pass --resume false to overwrite "
                             "it or choose another --output_dir")
    args = state.get("args") or {}
    args = vars(args) if hasattr(args, "__dict__") else dict(args)   # the reference saves an argparse Namespace
    return {"args": args, "epoch": int(state["epoch"]), "it": int(state.get("it", 0)),
            "world_size": int(state.get("world_size") or 1)}


def _show(value) -> str:
    """A value as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "''" if value == "" else str(value)


def _flag(name: str, value) -> str:
    return f"--{name} {_show(value)}"


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compare(cfg: TrainConfig, saved: dict, world_size: int, n_images: int) -> tuple[list, list, list[str]]:
    """(differences that stop: [(what, old, new)], the flags restoring them, accepted notes)."""
    from .config import to_dict
    args, new = saved["args"], to_dict(cfg)
    old_rec = args.get("resume") or {}
    new_rec = record(cfg, world_size, n_images)
    bad, fixes, notes = [], [], []
    if not args:
        return bad, fixes, ["the checkpoint records no config: not compared with this one"]
    defaults = to_dict(TrainConfig())
    for name in (f.name for f in fields(TrainConfig)):
        if name in SAFE or name in DERIVED:
            continue
        old = args.get(name, defaults[name])   # a field newer than the checkpoint: it ran with the default
        if not _same(old, new[name]):
            bad.append((name, old, new[name]))
            fixes.append(_flag(name, old))
    # data: what is read (resolved path) and how much of it
    old_data = old_rec.get("data") or data_identity(args.get("data_path", cfg.data_path))
    if old_data != new_rec["data"]:
        bad.append(("data_path", old_data, new_rec["data"]))
        fixes.append(_flag("data_path", args.get("data_path", old_data)))
    elif "n_images" in old_rec and old_rec["n_images"] != new_rec["n_images"]:
        bad.append(("number of images", old_rec["n_images"], new_rec["n_images"]))
        fixes.append(_flag("max_images", args.get("max_images", 0)) if args.get("max_images") != cfg.max_images
                     else "the same images")
    # global batch = batch_size_per_gpu x world size (it sets the steps per epoch and the lr)
    old_ws = int(old_rec.get("world_size", saved["world_size"]))
    old_b = int(old_rec.get("batch_size_per_gpu", args.get("batch_size_per_gpu", cfg.batch_size_per_gpu)))
    old_global = int(old_rec.get("global_batch", old_b * old_ws))
    if old_global != new_rec["global_batch"]:
        bad.append(("global batch (batch_size_per_gpu x world size)", f"{old_global} ({old_b} x {old_ws})",
                    f"{new_rec['global_batch']} ({cfg.batch_size_per_gpu} x {world_size})"))
        fixes.append(_flag("batch_size_per_gpu", old_global // world_size) if old_global % world_size == 0
                     else f"{old_ws} processes with --batch_size_per_gpu {old_b}")
    elif old_ws != world_size:
        notes.append(f"world size {old_ws} -> {world_size} with the same global batch {old_global} "
                     f"({old_b} x {old_ws} -> {cfg.batch_size_per_gpu} x {world_size}): the checkpoint is "
                     "resharded; the random streams restart (the run continues correctly, not bit-for-bit)")
    elif "steps_per_epoch" in old_rec and old_rec["steps_per_epoch"] != new_rec["steps_per_epoch"] and not bad:
        bad.append(("steps per epoch", old_rec["steps_per_epoch"], new_rec["steps_per_epoch"]))
        fixes.append("the same data and batch")
    # epochs: more only when asked for explicitly
    old_epochs = int(args.get("epochs", cfg.epochs))
    if cfg.epochs != old_epochs:
        if cfg.extend_epochs and cfg.epochs > old_epochs:
            notes.append(f"epochs {old_epochs} -> {cfg.epochs} (--extend_epochs): the lr, weight-decay, teacher "
                         f"momentum and temperature schedules are rebuilt for {cfg.epochs} epochs and training "
                         f"continues at iteration {saved['it']}")
        elif cfg.epochs > old_epochs:
            bad.append(("epochs", old_epochs, f"{cfg.epochs} (to train longer on purpose add --extend_epochs)"))
            fixes.append(_flag("epochs", old_epochs))
        else:
            bad.append(("epochs", old_epochs, cfg.epochs))
            fixes.append(_flag("epochs", old_epochs))
    for name in SAID:
        if name in args and not _same(args[name], new[name]):
            notes.append(f"{name} {args[name]!r} -> {new[name]!r}")
    return bad, fixes, notes


def check_resume(cfg: TrainConfig, output_dir: str, world_size: int, n_images: int) -> Resume | None:
    """The checkpoint to resume from (None: start fresh), after checking it against `cfg`.
    Raises ResumeMismatch (exit 2) or RunComplete (exit 0); reads only, writes nothing."""
    from . import checkpoint
    if not cfg.resume or not (path := checkpoint.find(output_dir)):
        return None
    saved = read_saved(path)
    bad, fixes, notes = compare(cfg, saved, world_size, n_images)
    if bad:
        diffs = "; ".join(f"{what} {_show(old)} -> {_show(new)}" for what, old, new in bad)
        raise ResumeMismatch(
            f"--output_dir {output_dir} holds a checkpoint of another run ({path}, epoch {saved['epoch']}): "
            f"{diffs}. Fix: {' '.join(dict.fromkeys(fixes))} to continue it, or --resume false to start over "
            f"(overwriting it), or another --output_dir")
    if saved["epoch"] >= cfg.epochs:
        raise RunComplete(
            f"the run in {output_dir} is complete ({saved['epoch']}/{cfg.epochs} epochs, iteration {saved['it']}, "
            f"{path}); to train longer pass --epochs N --extend_epochs with N > {cfg.epochs} (the schedules are "
            f"rebuilt for N epochs), or start over with --resume false or another --output_dir")
    return Resume(path, saved["epoch"], saved["it"], notes)
