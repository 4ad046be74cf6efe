"""torch backend of MultiCropLoader: a DataLoader over `DataAugmentationDINO`.

Workers decode with PIL (`images.decode_rgb`) and run the reference
augmentation with a per-sample generator (seeded by seed/epoch/index). A bad
file is replaced by the next readable one in the dataset (on_error="skip",
logged with its name; the loader counts them) or raises (on_error="fail").
"""
from __future__ import annotations

import gc
import logging
import random
import sys

import torch
from PIL import Image

from .config import AugmentConfig
from .images import BadImageError, decode_rgb
from .reference import DataAugmentationDINO
from .sampling import sample_seed
from .sources import Source

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 64


def load_pil(source: Source, i: int) -> Image.Image:
    """Image `i` of `source` as 8-bit RGB PIL, or BadImageError naming it."""
    if not source.encoded:
        return Image.fromarray(source.read_array(i), mode="RGB")
    try:
        data = source.read(i)
    except OSError as err:
        raise BadImageError(f"{source.name(i)}: cannot read ({err})") from None
    return decode_rgb(data, source.name(i))


class MultiCropDataset(torch.utils.data.Dataset):
    """Item (index, epoch) -> (crops list of (3,S,S) fp32, label, names skipped)."""

    def __init__(self, source: Source, config: AugmentConfig, seed: int, on_error: str):
        self.source, self.seed, self.on_error = source, seed, on_error
        self.transform = DataAugmentationDINO(config=config)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        index, epoch = key
        skipped = []
        i = index
        while True:
            try:
                image = load_pil(self.source, i)
                break
            except BadImageError as err:
                if self.on_error == "fail":
                    raise
                log.warning("skipping bad image: %s", err)
                skipped.append(self.source.name(i))
                if len(skipped) >= min(MAX_CONSECUTIVE_BAD, len(self.source)):
                    raise BadImageError(f"{len(skipped)} consecutive unreadable images from "
                                        f"{skipped[0]}; is the data corrupt?") from None
                i = (i + 1) % len(self.source)   # the next image stands in for the bad one
        s = sample_seed(self.seed, epoch, i)
        crops = self.transform(image, generator=torch.Generator().manual_seed(s), rng=random.Random(s))
        return crops, int(self.source.labels[i]), skipped


def collate(items):
    crops = [torch.stack([it[0][k] for it in items]) for k in range(len(items[0][0]))]  # ncrops x (B,3,S,S)
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    skipped = [name for it in items for name in it[2]]
    return crops, labels, skipped


def _worker_init(_):
    # A forked worker inherits the parent's uncollected garbage. If that holds a DALI
    # pipeline, collecting it here runs its destructor, which waits forever on executor
    # threads that do not exist in the child: keep the inherited objects out of GC.
    gc.freeze()


def make_dataloader(dataset: MultiCropDataset, keys: list, batch_size: int, drop_last: bool,
                    num_workers: int, pin_memory: bool):
    if num_workers > 0 and "nvidia.dali" in sys.modules:
        gc.collect()   # destroy garbage DALI pipelines here, before the fork (see _worker_init)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=keys, drop_last=drop_last, collate_fn=collate,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None)
