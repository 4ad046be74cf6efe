"""DALI backend of MultiCropLoader: host reader + DALI graph + hand-off to torch.

The host side (`HostReader`, called by DALI's external source once per batch)
reads each sample's bytes, checks them (header + end marker, see
`images.inspect_encoded`; with validate="once", the default, also one full PIL
decode the first time an image is seen, because JPEG decoders turn garbled
entropy-coded data into garbage with only a warning), replaces a bad file by the next readable one
(on_error="skip", logged by name) or raises (on_error="fail"), transcodes the
rare formats the GPU decoder would treat differently from PIL (CMYK, 16-bit,
palette, alpha) into 8-bit RGB PNG, and draws the sample's augmentation
decisions. The graph (dali_pipeline.py) does the pixels. Outputs are copied
into torch tensors on the loader's device (stream-ordered on the GPU).
"""
from __future__ import annotations

import io
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .dali_params import draw_params
from .images import BadImageError, decode_rgb, inspect_encoded, verify_decodes
from .sampling import sample_seed

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 64


class HostReader:
    """DALI external-source callback: BatchInfo -> (encoded, labels, params) lists."""

    def __init__(self, source, cfg, seed: int, on_error: str, batch_size: int, threads: int,
                 validate: str = "once"):
        self.source, self.cfg, self.seed, self.on_error = source, cfg, seed, on_error
        self.validate = validate
        self.verified: set[int] = set()   # indices fully decoded once by PIL without error
        self.batch_size = batch_size
        self.indices = np.zeros(0, dtype=np.int64)
        self.epoch = 0
        self.skipped: list[str] = []
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def start_epoch(self, indices: np.ndarray, epoch: int) -> None:
        self.indices, self.epoch, self.skipped = indices, epoch, []

    def _load(self, i: int):
        """-> (array for DALI, height, width) of image i, or BadImageError."""
        src = self.source
        if not src.encoded:
            arr = src.read_array(i)
            return np.ascontiguousarray(arr), arr.shape[0], arr.shape[1]
        name = src.name(i)
        try:
            data = src.read(i)
        except OSError as err:
            raise BadImageError(f"{name}: cannot read ({err})") from None
        info = inspect_encoded(data, name)
        if not info.gpu_decodable:       # CMYK, 16-bit, palette, alpha, other formats: PIL path
            buf = io.BytesIO()
            decode_rgb(data, name).save(buf, format="PNG", compress_level=1)
            data = buf.getvalue()
        elif self.validate == "once" and i not in self.verified:
            # libjpeg / nvJPEG decode garbled entropy data into garbage with at most a warning;
            # PIL raises. One full host decode per image (first epoch), remembered afterwards.
            verify_decodes(data, name)
            self.verified.add(i)
        return np.frombuffer(data, dtype=np.uint8), info.height, info.width

    def _sample(self, index: int):
        i, n, skipped = int(index), len(self.source), []
        while True:
            try:
                arr, h, w = self._load(i)
                break
            except BadImageError as err:
                if self.on_error == "fail":
                    raise
                log.warning("skipping bad image: %s", err)
                skipped.append(self.source.name(i))
                if len(skipped) >= min(MAX_CONSECUTIVE_BAD, n):
                    raise BadImageError(f"{len(skipped)} consecutive unreadable images from "
                                        f"{skipped[0]}; is the data corrupt?") from None
                i = (i + 1) % n
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, i))
        params = draw_params(rng, h, w, self.cfg)
        return arr, np.int64(self.source.labels[i]), params, skipped

    def __call__(self, info):
        start = info.iteration * self.batch_size
        batch = self.indices[start:start + self.batch_size]
        if len(batch) == 0:
            raise StopIteration
        samples = list(self.pool.map(self._sample, batch) if self.pool else map(self._sample, batch))
        for s in samples:
            self.skipped += s[3]
        return [s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples]


def _to_torch(tensor_list, device: torch.device, stream=None) -> torch.Tensor:
    """A uniform DALI TensorList -> torch tensor on `device` (a copy; GPU lists are
    copied on `stream`, host lists through host memory)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    dense = tensor_list.as_tensor()
    on_gpu = isinstance(tensor_list, TensorListGPU)
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype],
                      device=device if on_gpu else torch.device("cpu"))
    feed_ndarray(dense, out, cuda_stream=stream if on_gpu else None)
    return out if out.device == device else _host_to(out, device)


def _host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory, asynchronously: a pageable
    copy would wait for all the work queued on the compute stream (the previous training
    step), and that GPU compute would count as data time."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class DaliMultiCrop:
    """Builds the pipeline once; `epoch(indices, epoch)` yields (crops, labels, skipped)."""

    def __init__(self, loader, return_params: bool = False):
        from .dali_pipeline import multicrop_pipeline
        # weak: the loader owns this object; a loader <-> backend cycle would keep the DALI
        # pipeline (and its threads) alive until a GC pass, possibly inside a forked process
        self.loader = loader if isinstance(loader, weakref.ProxyType) else weakref.proxy(loader)
        loader = self.loader
        self.return_params = return_params
        on_gpu = loader.device.type == "cuda"
        threads = max(1, loader.num_workers)
        verified = self.reader.verified if getattr(self, "reader", None) else set()
        self.reader = HostReader(loader.source, loader.config, loader.seed, loader.on_error,
                                 loader.batch_size, threads, loader.validate)
        self.reader.verified = verified
        self.ncrops = loader.config.ncrops
        device_id = (loader.device.index if loader.device.index is not None else torch.cuda.current_device()
                     ) if on_gpu else None
        self.reader_kind = native_reader_kind(loader.source) if loader.reader == "native" else "host"
        native = {}
        if self.reader_kind == "file":
            native = dict(files=loader.source.names, labels=loader.source.labels.tolist())
        elif self.reader_kind == "webdataset":
            native = dict(shards=loader.source.shards)
        self.pipe = multicrop_pipeline(
            source=self.reader, cfg=loader.config, device="gpu" if on_gpu else "cpu",
            encoded=loader.source.encoded, half=loader.dtype == torch.float16,
            reader=self.reader_kind, shuffle=loader.shuffle, rank=loader.rank,
            world_size=loader.world_size, **native,
            batch_size=loader.batch_size, num_threads=threads, device_id=device_id,
            seed=int(loader.seed) + 7919 * int(loader.rank), prefetch_queue_depth=2,
            exec_dynamic=True)
        self.pipe.build()
        self.copy_stream = torch.cuda.Stream(loader.device) if on_gpu else None
        self._state = "fresh"   # fresh | running | done (the last epoch ran to its end)

    def _copy_crops(self, outs) -> list[torch.Tensor]:
        """The ncrops DALI outputs -> torch tensors on the loader's device, in its dtype."""
        loader = self.loader
        if self.copy_stream is None:
            crops = [_to_torch(outs[k], loader.device) for k in range(self.ncrops)]
        else:
            # Copy on a side stream and wait for those copies only (not for the model's work
            # queued on the current stream): DALI may reuse its buffers once `outs` is dropped.
            # The tensors come from the side stream's pool; record_stream keeps the allocator
            # from recycling them while the current stream still uses them.
            with torch.cuda.stream(self.copy_stream):
                crops = [_to_torch(outs[k], loader.device, self.copy_stream) for k in range(self.ncrops)]
            self.copy_stream.synchronize()
            current = torch.cuda.current_stream(loader.device)
            for c in crops:
                c.record_stream(current)
        return [c.to(loader.dtype) for c in crops]

    def epoch(self, indices: np.ndarray, epoch: int):
        if self.reader_kind != "host":
            yield from self._native_epoch(len(indices) // self.loader.batch_size)
            return
        loader = self.loader
        if loader.drop_last:
            indices = indices[: (len(indices) // loader.batch_size) * loader.batch_size]
        if self._state == "running":   # last epoch abandoned half-way: drop its prefetched batches
            self.__init__(loader, self.return_params)
        self.reader.start_epoch(indices, epoch)
        if self._state == "done":
            self.pipe.reset()
        self._state = "running"
        nbatches = -(-len(indices) // loader.batch_size)
        reported = 0
        for b in range(nbatches):
            if b == nbatches - 1:
                self._state = "done"
            outs = list(self.pipe.run())
            crops = self._copy_crops(outs)
            del outs[: self.ncrops]
            labels = _to_torch(outs[0], loader.device)
            skipped = self.reader.skipped[reported:]
            reported += len(skipped)
            if self.return_params:
                yield crops, labels, skipped, _to_torch(outs[1], torch.device("cpu"))
            else:
                yield crops, labels, skipped

    def _native_epoch(self, nbatches: int):
        """Native readers stream: DALI shuffles (buffer of 1024) and shards by rank itself,
        wrapping around its epochs; a loader epoch is `nbatches` batches of that stream."""
        loader = self.loader
        for _ in range(nbatches):
            outs = list(self.pipe.run())
            crops = self._copy_crops(outs)
            raw = outs[self.ncrops]
            if self.reader_kind == "file":
                labels = torch.from_numpy(raw.as_array().reshape(-1).astype(np.int64))
            else:   # webdataset .cls members: ASCII integers, empty when absent
                labels = torch.tensor([int(bytes(np.asarray(raw[i])).decode().strip() or -1)
                                       for i in range(len(raw))], dtype=torch.long)
            labels = _host_to(labels, loader.device)
            if self.return_params:
                yield crops, labels, [], _to_torch(outs[self.ncrops + 1], torch.device("cpu"))
            else:
                yield crops, labels, []


def native_reader_kind(source) -> str:
    from .sources import FileSource, TarSource
    if isinstance(source, TarSource):
        return "webdataset"
    if isinstance(source, FileSource):
        return "file"
    raise ValueError(f"reader='native' reads files or tar shards, not {source!r}; use reader='host'")


def scan_files(source, on_error: str, threads: int):
    """Up-front check for native readers (which cannot skip or transcode at run time):
    -> (FileSource of the usable files, names left out). Header + end marker per file,
    plus the formats the GPU decoder would treat differently from PIL (CMYK, 16-bit...)."""
    from .sources import FileSource

    def check(i):
        try:
            with open(source.names[i], "rb") as f:
                data = f.read()
            info = inspect_encoded(data, source.names[i])
        except (BadImageError, OSError) as err:
            return str(err)
        if not info.gpu_decodable:
            return (f"{source.names[i]}: {info.format} {info.mode} {info.bits}-bit needs conversion, "
                    "which reader='native' cannot do; use reader='host' or `dino-fast pack` the data")
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(check, range(len(source))))
    bad = [p for p in problems if p]
    if bad and on_error == "fail":
        raise BadImageError(bad[0])
    for p in bad:
        log.warning("reader='native': leaving out %s", p)
    keep = [i for i, p in enumerate(problems) if p is None]
    if not keep:
        raise BadImageError(f"none of the {len(source)} files is usable; first problem: {bad[0]}")
    return (FileSource([source.names[i] for i in keep], source.labels[keep], source.classes, source.kind),
            [source.names[i] for i, p in enumerate(problems) if p])
