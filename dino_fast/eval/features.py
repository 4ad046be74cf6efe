"""Frozen-backbone features for k-NN and the linear probe, with a disk cache.

`extract_features` runs the backbone over a loader in order (bf16 autocast on
a GPU) and stacks the features; the k-NN features are the teacher's CLS
token, L2-normalised, as the reference eval_knn.py. `FeatureCache` stores
them keyed by the checkpoint file's sha256, the checkpoint key, the dataset
(root + every file's path, size, mtime and label), the transform and the
feature kind, so a second run loads them instead of recomputing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F

from dino_fast.eval.io import atomic_torch_save, cached_file_sha256

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when the feature computation changes


def cls_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's CLS output (B, D) (the reference k-NN features)."""
    return model(images)


def _images(batch) -> torch.Tensor:
    """The images of a batch: a tensor, or the first item of (images, labels/indices)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device | str, *,
                     feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = cls_features,
                     normalize: bool = True, amp: bool | None = None, progress: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """Features (N, F) float32 on `device` of every sample of `loader`, in
    loader order (use an unshuffled loader; labels are not needed here).

    feature_fn(model, images) -> (B, F): default the CLS token (k-NN);
    normalize: L2-normalise each row (the reference k-NN); amp: bf16 autocast,
    default on for CUDA. The model is put in eval mode."""
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    model.eval()
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    out, parts, filled = None, [], 0
    try:
        for batch in loader:
            x = _images(batch).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                f = feature_fn(model, x)                         # (B, F)
            f = f.float()
            if normalize:
                f = F.normalize(f, dim=1, p=2)
            if total is not None:
                if out is None:
                    out = torch.empty(total, f.shape[1], dtype=torch.float32, device=device)
                out[filled:filled + f.shape[0]] = f
            else:
                parts.append(f)
            filled += f.shape[0]
            if bar is not None:
                bar.update(f.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if total is None:
        return torch.cat(parts) if parts else torch.empty(0, 0, device=device)
    if filled != total:
        raise RuntimeError(f"the loader gave {filled} samples but its dataset has {total}; "
                           "use drop_last=False and no sampler for feature extraction")
    return out if out is not None else torch.empty(0, 0, device=device)


class FeatureCache:
    """Features on disk under `cache_dir`, one file per key (atomic writes)."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir = cache_dir

    @staticmethod
    def default_dir() -> str:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "dino_fast", "features")

    def key(self, checkpoint: str, **parts) -> dict:
        """The full key: the checkpoint's content hash plus `parts`."""
        sha = cached_file_sha256(checkpoint, self.cache_dir) if self.cache_dir else "nocache"
        return {"checkpoint_sha256": sha, "version": FEATURES_VERSION, **parts}

    def _path(self, key: dict) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return os.path.join(self.cache_dir, f"{digest[:32]}.pt")

    def get_or_compute(self, key: dict, compute: Callable[[], dict], device: torch.device | str = "cpu") -> dict:
        """The cached dict of tensors for `key`, else compute() (saved on the CPU)."""
        if not self.cache_dir:
            return compute()
        path = self._path(key)
        if os.path.isfile(path):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                log.info("features loaded from the cache %s", path)
                return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
            except Exception as e:  # corrupt cache entry: recompute it
                log.warning("feature cache %s unreadable (%s); recomputing", path, e)
        data = compute()
        atomic_torch_save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in data.items()}, path)
        log.info("features cached to %s", path)
        return data


def dataset_features(model: torch.nn.Module, dataset, *, checkpoint: str, checkpoint_key: str, kind: str = "cls",
                     feature_fn: Callable = cls_features, normalize: bool = True, batch_size: int = 128,
                     num_workers: int = 8, device: torch.device | str = "cpu", cache_dir: str | None = None,
                     amp: bool | None = None, progress: bool = True,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F) on `device`, labels (N,)) of an ImageFolder, through
    the feature cache. `kind` names the feature computation in the cache key
    (e.g. "cls", "linear-n4-avgpool0")."""
    from dino_fast.eval.data import dataset_digest, dataset_labels, eval_loader
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    cache = FeatureCache(cache_dir)

    def compute() -> dict:
        loader = eval_loader(dataset, batch_size, num_workers, device)
        feats = extract_features(model, loader, device, feature_fn=feature_fn, normalize=normalize, amp=amp,
                                 progress=progress, desc=desc)
        return {"features": feats, "labels": dataset_labels(dataset)}

    key = None
    if cache.cache_dir:
        key = cache.key(checkpoint, checkpoint_key=checkpoint_key, kind=kind, normalize=normalize,
                        amp_bf16=bool(amp), dataset=dataset_digest(dataset),
                        transform=repr(getattr(dataset, "transform", None)))
    data = cache.get_or_compute(key, compute, device) if key else compute()
    return data["features"].to(device), data["labels"].to(device)
