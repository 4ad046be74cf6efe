"""Sizes that fit the machine and the data when the user brings a folder and no preset.

`dino-fast train --data_path myfolder` without `--preset` used to take the ImageNet defaults
(ViT-S/16, 224 px, K = 65536, batch 64, 100 epochs): a 704 MB checkpoint (plus a copy in the
first epoch) and 114 GFLOP per image per step, 12x the small preset's 9.5 (model.flops). `choose_sizes` picks instead, automatically and
saying so in one message (the command prints it with the way to override):

- the `small` preset (presets.py: ViT-tiny/16, 128 px global / 64 px local crops, K = 4096,
  batch 32, a ~130 MB checkpoint) on a CPU, or for fewer than `LARGE` images on a GPU;
- the reference defaults for a large dataset on a GPU (the paper's ImageNet setting);
- with the small preset, a per-GPU batch lowered to fit the dataset (the largest power of two
  that gives at least 4 steps per epoch) when the data is that small and no
  --batch_size_per_gpu was given; with --epochs and no --warmup_epochs, a warm-up of a tenth of
  the epochs (the preset's 10 of 100), so `--epochs 5` runs.

Automatic rather than only suggested: a first run on one's own folder should work and finish
as the README says, and every field given on the command line still wins over the choice
(a preset only fills the fields the user did not give); `--preset NAME` turns the choice off.

The images are counted up to `LARGE` only (`count_images`), so a 1.28M-image folder costs
no full listing here; the loader lists it once, later.

`checkpoint_bytes` / `checkpoint_line`: the size of checkpoint.pth (student, teacher and the
optimizer state, fp32) and of its periodic copies, for `--dry_run`.
"""
from __future__ import annotations

import json
import os
import tarfile

LARGE = 20_000          # images from which a GPU run keeps the reference (ImageNet) defaults
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1, "lars": 1}   # fp32 buffers per trainable parameter


# ---------------------------------------------------------------------------------- counting
def _count_tar(paths: list[str], limit: int) -> int:
    folders = {os.path.dirname(p) for p in paths}
    packed = 0
    for folder in folders:                         # `dino-fast pack` writes the count next to its shards
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(folder, name)) as f:
                        meta = json.load(f)
                    listed = set(meta.get("shards") or []) if isinstance(meta, dict) else set()
                    if listed and listed <= {os.path.basename(p) for p in paths}:
                        packed += int(meta.get("images", 0))
                except (OSError, ValueError, TypeError):
                    pass
    if packed:
        return min(packed, limit)
    n = 0
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                n += member.isfile() and member.name.partition(".")[2].lower() in ("jpg", "jpeg", "png")
                if n >= limit:
                    return n
    return n


def count_images(data_path: str, limit: int = LARGE) -> int | None:
    """Images in data_path, counted up to `limit` (folders walked, .txt lines, tar members);
    None when it cannot be told here (the loader then reports the problem)."""
    import glob

    from dino_fast.pipelines.images import is_image_file
    try:
        if any(c in data_path for c in "*?["):
            return _count_tar(sorted(p for p in glob.glob(data_path) if p.endswith(".tar")), limit)
        if os.path.isfile(data_path):
            if data_path.endswith(".tar"):
                return _count_tar([data_path], limit)
            n = 0
            with open(data_path, encoding="utf-8") as f:
                for line in f:
                    n += bool(line.strip()) and not line.lstrip().startswith("#")
                    if n >= limit:
                        break
            return n
        shards = sorted(os.path.join(data_path, f) for f in os.listdir(data_path) if f.endswith(".tar"))
        if shards:
            return _count_tar(shards, limit)
        n = 0
        for _, dirs, files in os.walk(data_path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            n += sum(map(is_image_file, files))
            if n >= limit:
                return limit
        return n
    except (OSError, UnicodeDecodeError, tarfile.TarError):
        return None


# ---------------------------------------------------------------------------------- the choice
def _gpu() -> str | None:
    """'<name>, <GB> GB' of the local CUDA device, or None."""
    import torch
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name}, {props.total_memory / 2**30:.0f} GB"


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def choose_sizes(preset: str | None, overrides: dict, world_size: int | None = None,
                 gpu: str | None | bool = True) -> tuple[str | None, dict, str | None]:
    """(preset, overrides, message) for `dino-fast train`: unchanged when a preset is named or
    no --data_path is given; otherwise the sizes described in the module docstring, and a
    message saying what was chosen, why, and how to override (None when nothing was chosen).
    `gpu`: the device description, None for a CPU, True to look (--device decides first)."""
    data_path = overrides.get("data_path")
    if preset is not None or data_path in (None, "demo"):   # the demo preset, a named one, or --data_path demo
        return preset, overrides, None
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    device = overrides.get("device", "auto")
    if gpu is True:
        gpu = None if device == "cpu" else _gpu()
    n = count_images(data_path)
    size = "an unknown number of" if n is None else (f"{LARGE}+" if n >= LARGE else str(n))
    where = f"the GPU ({gpu})" if gpu else "the CPU"
    if gpu and (n is None or n >= LARGE):
        return None, overrides, (f"no --preset: {size} images on {where}: the reference ImageNet defaults "
                                 "(ViT-S/16, 224 px, K = 65536, batch 64 per GPU, 100 epochs); --dry_run shows "
                                 "the memory plan, --preset small a run sized for small data")
    from .presets import PRESETS
    chosen = "small"
    if n == 0:                   # nothing to size for: the loader names the empty folder
        return chosen, overrides, None
    overrides = dict(overrides)
    batch = overrides.get("batch_size_per_gpu", PRESETS[chosen]["batch_size_per_gpu"])
    lowered = ""
    fit = _pow2_floor(max(1, n // world_size // 4)) if n is not None else batch   # >= 4 steps per epoch
    if "batch_size_per_gpu" not in overrides and fit < batch:
        batch = overrides["batch_size_per_gpu"] = fit
        lowered = f" for {size} images"
    yours = sorted(k for k in PRESETS[chosen] if k in overrides and k != "batch_size_per_gpu")
    if "epochs" in overrides and "warmup_epochs" not in overrides:   # the preset's 10 of 100 epochs
        overrides["warmup_epochs"] = min(PRESETS[chosen]["warmup_epochs"], int(overrides["epochs"]) // 10)
    kept = f"; your {' '.join('--' + k for k in yours)} kept" if yours else ", one ~130 MB checkpoint"
    return chosen, overrides, (
        f"no --preset: {size} images on {where} -> preset small (ViT-tiny/16, 128/64 px crops, K = 4096, "
        f"batch {batch} per process{lowered}{kept}); --preset vit_s16_in1k for the paper's ViT-S/16, or any "
        "--<field> to override")


# ---------------------------------------------------------------------------------- checkpoint size
def checkpoint_bytes(student, optimizer: str = "adamw") -> int:
    """Bytes of checkpoint.pth for this student (the teacher has the same shape): student and
    teacher state dicts plus the optimizer's fp32 buffers for the trainable parameters."""
    state = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return 2 * state + OPTIMIZER_STATES.get(optimizer, 2) * 4 * trainable


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def checkpoint_line(cfg, student) -> str:
    """One line for --dry_run: checkpoint.pth's size and what the periodic copies add."""
    one = checkpoint_bytes(student, cfg.optimizer)
    line = f"checkpoint: {_mb(one)} per save (student + teacher + {cfg.optimizer} state, fp32)"
    if cfg.saveckp_freq:
        copies = len(range(0, cfg.epochs, cfg.saveckp_freq))
        line += (f", plus a copy every {cfg.saveckp_freq} epochs from the first: {copies} copies, "
                 f"{_mb(one * (copies + 1))} on disk at the end (--saveckp_freq 0: only checkpoint.pth)")
    else:
        line += ", checkpoint.pth only (--saveckp_freq 0)"
    return line
