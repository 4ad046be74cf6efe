"""Online k-NN monitoring during training (`--monitor_knn PATH`,
`--monitor_every N`): the teacher backbone's weighted 20-NN top-1 / top-5
(T = 0.07, L2-normalised CLS features, as eval_knn.py) on a small labelled
ImageFolder (PATH/train as the memory bank, PATH/val as the queries),
every N epochs and after the last one.

- Data: the monitor images are decoded once, at the start of the run,
  resized (bicubic) and centre-cropped to the global crop size, and kept
  as uint8 tensors on the host (a few threads decode; no DataLoader
  workers). Each evaluation is forward passes over them on the training
  device, then the blocked k-NN of eval/knn.py there.
- Multi-process: sharded. Rank r holds images r, r + W, r + 2W, ... of each
  split (padded by wrapping round, so every rank runs the same number of
  forward passes: an FSDP2-sharded teacher all-gathers its parameters in
  every forward, with every rank taking part). The features are
  all-gathered (one collective per split) and every rank computes the same
  k-NN; rank 0 logs it. No rank waits on another beyond the all-gathers.
- FSDP2: features come from the teacher wrapper's own forward (its root
  hooks unshard the backbone's parameters), read by a hook on the
  backbone's output; the head's output is dropped. A plain teacher runs
  its backbone alone.
"""
from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)

K, T = 20, 0.07
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of this rank: rank, rank + world, ... padded by wrapping to ceil(n / world)."""
    per = math.ceil(n / world)
    return [(rank + j * world) % n for j in range(per)]


def _decode(paths: list[str], crop: int, resize: int, threads: int) -> torch.Tensor:
    """(N, 3, crop, crop) uint8 of the images: Resize(resize, bicubic), CenterCrop(crop)."""
    import numpy as np
    from torchvision import transforms as TV

    from dino_fast.eval.data import load_rgb
    tf = TV.Compose([TV.Resize(resize, interpolation=TV.InterpolationMode.BICUBIC), TV.CenterCrop(crop)])

    def one(p):
        return torch.from_numpy(np.array(tf(load_rgb(p)), dtype=np.uint8)).permute(2, 0, 1)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return torch.stack(list(pool.map(one, paths)))


class KnnMonitor:
    def __init__(self, path: str, every: int, *, crop: int, resize: int | None = None, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", batch_size: int = 64, threads: int = 4,
                 epochs: int | None = None):
        from dino_fast.eval.data import train_val_folders
        if every < 1:
            raise ValueError(f"--monitor_every {every}: must be >= 1 (epochs between two evaluations)")
        train, val = train_val_folders(path)       # errors name the folder (train/ and val/ ImageFolders)
        self.path, self.every, self.epochs = path, every, epochs
        self.rank, self.world, self.device, self.batch_size = rank, world_size, torch.device(device), batch_size
        self.num_classes = len(train.classes)
        self.k = min(K, len(train))
        self.sizes = {"train": len(train), "val": len(val)}
        resize = resize or round(crop * 256 / 224)
        t0 = time.perf_counter()
        self.images, self.labels = {}, {}
        for name, ds in (("train", train), ("val", val)):
            idx = _shard(len(ds), rank, world_size)
            self.images[name] = _decode([ds.samples[i][0] for i in idx], crop, resize, threads)  # (n_r, 3, c, c)
            self.labels[name] = torch.as_tensor(ds.targets, dtype=torch.int64)                # all N, every rank
        log.info("k-NN monitor: %s (%d train / %d val images, %d classes, %d px), rank %d holds %d + %d, "
                 "decoded in %.1f s", path, len(train), len(val), self.num_classes, crop, rank,
                 len(self.images["train"]), len(self.images["val"]), time.perf_counter() - t0)

    @classmethod
    def from_config(cls, cfg, rank: int, world_size: int, device) -> "KnnMonitor":
        return cls(cfg.monitor_knn, cfg.monitor_every, crop=cfg.global_size, rank=rank, world_size=world_size,
                   device=device, batch_size=cfg.batch_size_per_gpu, threads=min(8, os.cpu_count() or 1),
                   epochs=cfg.epochs)

    def due(self, epoch: int) -> bool:
        """Evaluate after epoch `epoch` (0-based): every `every` epochs and after the last."""
        return (epoch + 1) % self.every == 0 or (self.epochs is not None and epoch + 1 == self.epochs)

    @torch.no_grad()
    def _features(self, teacher: torch.nn.Module, images: torch.Tensor, autocast) -> torch.Tensor:
        """L2-normalised CLS features (n, D) float32 on the device of this rank's images."""
        backbone = getattr(teacher, "backbone", teacher)
        sharded = backbone is not teacher and hasattr(teacher, "unshard")    # an FSDP2 module
        mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = (images[i:i + self.batch_size].to(self.device, non_blocking=True).float() / 255 - mean) / std
            with autocast():
                if sharded:
                    got = []
                    hook = backbone.register_forward_hook(lambda m, inp, o: got.append(o))
                    try:
                        teacher([x])                                 # (b, K) dropped
                    finally:
                        hook.remove()
                    f = got[0]
                else:
                    f = backbone(x)                                  # (b, D)
            out.append(F.normalize(f.float(), dim=1))
        return torch.cat(out)

    def _gather(self, feats: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's shard (n_r, D) -> all N features in dataset order (N, D)."""
        if self.world == 1:
            return feats[:n]
        parts = [torch.empty_like(feats) for _ in range(self.world)]
        from dino_fast.runtime.launch import named_collective
        named_collective("all_gather k-NN monitor features", dist.all_gather, parts, feats.contiguous())
        full = torch.stack(parts, dim=1).reshape(-1, feats.shape[1])  # row j*W + r = item r + j*W
        return full[:n]

    def evaluate(self, teacher: torch.nn.Module, autocast=None, *, epoch: int, it: int) -> dict:
        """The log record of one evaluation (same numbers on every rank)."""
        import contextlib

        from dino_fast.eval.knn import knn_evaluate
        autocast = autocast or contextlib.nullcontext
        t0 = time.perf_counter()
        feats = {name: self._gather(self._features(teacher, self.images[name], autocast), self.sizes[name])
                 for name in ("train", "val")}
        res = knn_evaluate(feats["train"], self.labels["train"].to(self.device), feats["val"],
                           self.labels["val"].to(self.device), (self.k,), T, num_classes=self.num_classes)
        top1, top5 = res[self.k]
        rec = {"epoch": epoch, "it": it, "monitor_knn_top1": top1, "monitor_knn_top5": top5, "monitor_knn_k": self.k,
               "monitor_time_s": time.perf_counter() - t0}
        log.info("k-NN monitor after epoch %d: top-1 %.2f %%, top-5 %.2f %% (%d-NN, %.1f s)", epoch + 1, top1, top5,
                 self.k, rec["monitor_time_s"])
        return rec
