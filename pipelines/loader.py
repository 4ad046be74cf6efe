"""`MultiCropLoader`: the one data API of training.

    loader = MultiCropLoader("imagenet/train", batch_size=64, device="cuda",
                             rank=rank, world_size=world, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for crops, labels in loader:      # crops: 2 + N tensors (B, 3, S, S) on device
            ...

backend "dali" decodes on the GPU (nvJPEG) and augments there; "torch" runs
the reference torchvision pipeline in DataLoader workers; "tensor" augments
in-memory arrays (ArraySource) on batched tensors in the training process (no
workers); "auto" picks DALI when it imports and the device is CUDA, else
"tensor" for in-memory arrays, else "torch". The choice is logged.
"""
from __future__ import annotations

import logging
import os

import torch

from .config import AugmentConfig
from .sampling import epoch_indices, num_batches
from .sources import BatchSizeError, open_source

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ("auto", "dali", "torch", "tensor")


class PipelineError(ValueError):
    """A backend that is not one of BACKENDS or cannot run here; the message says what to use."""


class BackendUnavailableError(PipelineError, ImportError):
    """backend='dali' without NVIDIA DALI installed."""


def choose_backend(backend: str, device: torch.device, encoded: bool = True) -> str:
    if backend not in BACKENDS:
        raise PipelineError(f"backend={backend!r}: choose 'auto', 'dali', 'torch' or 'tensor'")
    if backend == "auto":
        if device.type == "cuda" and dali_available():
            return "dali"
        return "torch" if encoded else "tensor"
    if backend == "tensor" and encoded:
        raise PipelineError("backend='tensor' augments in-memory arrays (ArraySource); for image files or "
                         "shards use backend='torch' or 'dali'")
    if backend == "dali" and not dali_available():
        raise BackendUnavailableError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                                      "(or the build for your CUDA), or use backend='torch'")
    return backend


class MultiCropLoader:
    """Batches of DINO multi-crops `(crops, labels)` from a folder, list, shards or array.

    crops: list of 2 + local_crops_number tensors (B, 3, S, S) on `device` in
    `dtype`; labels: int64 (B,), -1 for unlabelled sources. Each rank reads a
    disjoint part of a per-epoch permutation (seed, epoch); `len()` is the
    number of batches per epoch on this rank. Bad images are skipped with a
    warning naming the file (`on_error="skip"`, counted in `.skipped`) or raise
    (`on_error="fail"`). DALI backend: `validate="once"` (default) fully decodes
    each image once on the host (first epoch) so garbled JPEG data cannot reach
    the GPU decoder, which would turn it into garbage silently; `"header"` only
    checks headers and end markers (for shards `dino-fast pack` validated).
    """

    def __init__(self, source, batch_size: int, global_crops_scale=(0.4, 1.0),
                 local_crops_scale=(0.05, 0.4), local_crops_number: int = 8, global_size: int = 224,
                 local_size: int = 96, backend: str = "auto", device=None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = True, shuffle: bool = True,
                 dtype: torch.dtype = torch.float32, num_workers: int | None = None,
                 on_error: str = "skip", validate: str = "once", reader: str = "host",
                 config: AugmentConfig | None = None, **config_overrides):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error={on_error!r}: choose 'skip' or 'fail'")
        if validate not in ("once", "header"):
            raise ValueError(f"validate={validate!r}: choose 'once' (full host decode the first time an "
                             "image is seen) or 'header' (header + end marker only, for packed shards)")
        self.validate = validate
        if reader not in ("host", "native"):
            raise ValueError(f"reader={reader!r}: choose 'host' (Python reader: exact per-epoch permutation, "
                             "bad files skipped at run time) or 'native' (DALI fn.readers.file/webdataset)")
        if reader == "native" and not drop_last:
            raise ValueError("reader='native' streams from DALI's readers and needs drop_last=True")
        self.reader = reader
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype}: choose torch.float32, torch.bfloat16 or torch.float16")
        if config is None:
            config = AugmentConfig(global_size=global_size, local_size=local_size,
                                   global_crops_scale=tuple(global_crops_scale),
                                   local_crops_scale=tuple(local_crops_scale),
                                   local_crops_number=local_crops_number, **config_overrides)
        elif config_overrides:
            raise TypeError(f"pass either config= or field overrides, not both: {sorted(config_overrides)}")
        self.config = config
        self.source = open_source(source)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last, self.shuffle, self.dtype = seed, drop_last, shuffle, dtype
        self.on_error = on_error
        self.num_workers = (min(8, max(1, (os.cpu_count() or 2) - 1)) if num_workers is None
                            else num_workers)
        self.epoch = 0
        self.skipped: list[str] = []       # bad files skipped in the current / last epoch
        self._check_size()
        self.backend = choose_backend(backend, self.device, self.source.encoded)
        if reader == "native" and self.backend != "dali":
            log.info("MultiCropLoader: reader='native' applies to the DALI backend only; ignored")
        log.info("MultiCropLoader: backend=%s (requested %s) device=%s source=%r crops=2x%d+%dx%d",
                 self.backend, backend, self.device, self.source, config.global_size,
                 config.local_crops_number, config.local_size)
        self._impl = None
        self.skipped_at_scan: list[str] = []
        if self.backend == "dali":
            from .dali_backend import DaliMultiCrop, scan_files
            from .sources import FileSource
            if reader == "native" and isinstance(self.source, FileSource):   # readers cannot skip
                self.source, self.skipped_at_scan = scan_files(self.source, on_error, self.num_workers)
                self._check_size()
            self._impl = DaliMultiCrop(self)
        elif self.backend == "tensor":
            from .tensor_backend import TensorMultiCrop
            self._impl = TensorMultiCrop(self)

    def _check_size(self) -> None:
        n_rank = len(self._indices())
        if n_rank < self.batch_size and self.drop_last:
            raise BatchSizeError(
                f"{self.source!r}: {n_rank} images on rank {self.rank} of {self.world_size} is fewer than "
                f"batch_size={self.batch_size} with drop_last; lower the batch size to at most {n_rank}",
                images=len(self.source), per_rank=n_rank, batch_size=self.batch_size, world_size=self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (same permutation on every rank)."""
        self.epoch = int(epoch)

    def _indices(self):
        return epoch_indices(len(self.source), epoch=self.epoch, seed=self.seed, rank=self.rank,
                             world_size=self.world_size, shuffle=self.shuffle, drop_last=self.drop_last)

    def __len__(self) -> int:
        return num_batches(len(self._indices()), self.batch_size, self.drop_last)

    def __iter__(self):
        self.skipped = []
        it = self._impl.epoch(self._indices(), self.epoch) if self._impl else self._torch_epoch()
        seen = set()
        for crops, labels, skipped in it:
            for name in skipped:      # a bad file can be hit twice (itself, and as a stand-in)
                if name not in seen:
                    seen.add(name)
                    self.skipped.append(name)
            yield crops, labels
        if self.skipped:
            more = f" and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
            log.warning("epoch %d: skipped %d bad image(s) on rank %d (on_error='skip'): %s%s",
                        self.epoch, len(self.skipped), self.rank, ", ".join(self.skipped[:20]), more)

    def _torch_epoch(self):
        from .torch_backend import MultiCropDataset, make_dataloader
        dataset = MultiCropDataset(self.source, self.config, self.seed, self.on_error)
        keys = [(int(i), self.epoch) for i in self._indices()]
        cuda = self.device.type == "cuda"
        loader = make_dataloader(dataset, keys, self.batch_size, self.drop_last, self.num_workers,
                                 pin_memory=cuda)
        for crops, labels, skipped in loader:
            crops = [c.to(self.device, non_blocking=cuda).to(self.dtype) for c in crops]
            yield crops, labels.to(self.device, non_blocking=cuda), skipped
