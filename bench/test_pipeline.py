"""Multi-crop data pipeline bench: images/s of the DALI pipeline against the
torch DataLoader pipeline (reference torchvision/PIL augmentation in worker
processes) for DINO's 2 x 224 + 10 x 96 crops, on the same JPEG set (real
photographs from scikit-image, ImageNet-like ~500 px), same CPU cores.

Both DALI front ends: reader="host" (Python reader, decisions drawn on the
host) and reader="native" (fn.readers.file, decisions drawn in the graph), with
the reference's random jitter order, and the host reader with the fixed order.
GPU: DALI decodes with nvJPEG ("mixed") and augments on the device; the torch
pipeline uses every CPU core in DataLoader workers; records merge into
bench/results/pipeline_<device>.json. CPU (smoke): a few images, both
pipelines on the host (DALI with device_id=None), shapes still asserted.
"""
import json
import os

import pytest
import torch

from bench.test_model import save_record
from dino_fast.benchmark import record, time_ms
from dino_fast.pipelines import MultiCropLoader, dali_available
from tests.test_pipeline_sources import write_photos

CROPS = dict(global_size=224, local_size=96, local_crops_number=10)
GPU = dict(images=1024, batch=128)
SMOKE = dict(images=8, batch=4)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, smoke):
    root = tmp_path_factory.mktemp("jpegs")
    write_photos(root, (SMOKE if smoke else GPU)["images"], size=500)
    return str(root)


def _epoch(loader, device):
    def run():
        n = 0
        for crops, labels in loader:
            n += labels.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n
    return run


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")
@pytest.mark.parametrize("reader,order", [("host", "random"), ("native", "random"), ("host", "fixed")])
def test_pipeline_dali_vs_torch(benchmark, device, smoke, spec, jpeg_folder, reader, order):
    c = SMOKE if smoke else GPU
    workers = os.cpu_count() or 2
    loaders = {b: MultiCropLoader(jpeg_folder, batch_size=c["batch"], backend=b, device=device,
                                  num_workers=workers, reader=reader, jitter_order=order, **CROPS)
               for b in ("dali", "torch")}
    for backend, loader in loaders.items():            # shapes, dtype, device of every crop
        crops, labels = next(iter(loader))
        assert [tuple(x.shape) for x in crops] == [(c["batch"], 3, 224, 224)] * 2 + [(c["batch"], 3, 96, 96)] * 10
        assert all(x.device.type == device.type and x.dtype == torch.float32 and torch.isfinite(x).all()
                   for x in crops), backend
        assert labels.shape == (c["batch"],)
    n = len(loaders["dali"]) * c["batch"]
    iters, warm = (1, 1) if smoke else (3, 1)
    ms = time_ms(_epoch(loaders["dali"], device), warm, iters, device_type="cpu")   # wall clock
    ms_ref = time_ms(_epoch(loaders["torch"], device), warm, iters, device_type="cpu")
    img_per_s, ref_img_per_s = n / (ms * 1e-3), n / (ms_ref * 1e-3)
    rec = record(ms / n, spec, ref_ms=ms_ref / n, op="pipeline", variant=f"dali_{reader}_{order}_vs_torch",
                 img_per_s=img_per_s, torch_img_per_s=ref_img_per_s, ratio=img_per_s / ref_img_per_s,
                 images=n, batch=c["batch"], crops="2x224+10x96", cpu_workers=workers, smoke=smoke)
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(_epoch(loaders["dali"], device), rounds=1, iterations=1, warmup_rounds=0)
    if not smoke:
        save_record("pipeline", f"dali_{reader}_{order}", rec)
        assert img_per_s > ref_img_per_s, rec
