"""The training data and the output folder, checked before the run writes anything.

`checked_loader(build, cfg, run)` checks that --output_dir can be created or
written, builds the loader (which opens the source: missing, empty,
unreadable sources raise `SourceError` at once) and turns the pipeline's
batch-size error into the words of the train command: the flag
(`--batch_size_per_gpu`), the dataset size and the largest batch that works.
The loop calls it before `config.json` is written, so a run that cannot start
leaves nothing in its output folder.
"""
from __future__ import annotations

import os

from .config import ConfigError


def batch_size_message(data_path: str, batch_size: int, images: int, per_rank: int, world_size: int) -> str:
    """One line: the batch is larger than the images one process gets per epoch."""
    share = f"{per_rank} per process on {world_size} processes" if world_size > 1 else "on 1 process"
    if per_rank < 1:
        return (f"{data_path} has {images} images, fewer than the {world_size} processes: add images or "
                "run fewer processes")
    return (f"--batch_size_per_gpu {batch_size} is larger than the dataset: {data_path} has {images} images "
            f"({share}) and the last incomplete batch of each epoch is dropped, so no step would run; "
            f"use --batch_size_per_gpu {per_rank} or less (or add images)")


def check_output_dir(output_dir: str) -> None:
    """--output_dir is a writable folder, or can be made in a writable one (nothing is created)."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"--output_dir {output_dir}: {path} is a file, not a folder; choose another --output_dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output_dir}: {path} is not writable; choose another --output_dir")


def checked_loader(build, cfg, run):
    """build(cfg, run) -> loader, after check_output_dir, with the batch-vs-dataset error naming
    --batch_size_per_gpu."""
    from dino_fast.pipelines.sources import BatchSizeError
    check_output_dir(cfg.output_dir)
    try:
        return build(cfg, run)
    except BatchSizeError as err:
        raise ConfigError(batch_size_message(cfg.data_path, cfg.batch_size_per_gpu, err.images, err.per_rank,
                                             err.world_size)) from None
