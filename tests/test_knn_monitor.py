"""Online k-NN monitor (--monitor_knn / --monitor_every): a tiny demo-config
training run writes its records at the right epochs, the last record's
top-1 / top-5 equal the reference eval_knn.py k-NN of the checkpointed
teacher on the same images, the loss-curve figure grows a k-NN panel;
under 2 gloo processes with an FSDP2-sharded teacher the sharded, padded,
all-gathered features equal the unsharded teacher's, and a 2-process run
logs its records without stalling."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.train.presets import resolve
from tests._dist import run_distributed

TINY = dict(patch_size=4, depth=2, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, global_size=16, local_size=8,
            local_crops_number=2, batch_size_per_gpu=8, max_images=32, epochs=3, warmup_epochs=1,
            lr=0.005, log_interval=2, num_workers=0, knn_eval=False, drop_path_rate=0.0, saveckp_freq=1,
            momentum_teacher=0.9, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _monitor_set(root, n_train=(5, 4, 4), n_val=(3, 2, 2)):
    """train/ and val/ ImageFolders of demo (Fashion-MNIST) images of 3 classes;
    odd counts: the 2-process shards need padding."""
    from dino_fast.train.demo import load_demo_arrays
    d = load_demo_arrays()
    for split, counts, xs, ys in (("train", n_train, d["x_train"], d["y_train"]),
                                  ("val", n_val, d["x_test"], d["y_test"])):
        for c, n in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i, k in enumerate(np.flatnonzero(ys == c)[:n]):
                Image.fromarray(xs[k]).save(folder / f"{i}.png")
    return str(root)


def _records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _reference_knn(checkpoint, data, crop=16, resize=18):
    """Teacher CLS features through the evaluation path (eval_transform, extract_features)
    and the reference eval_knn.py loop."""
    import dino_fast
    from dino_fast.eval.data import eval_loader, eval_transform, train_val_folders
    from dino_fast.eval.features import extract_features
    from dino_fast.eval.knn import knn_classifier_reference
    model = dino_fast.load(checkpoint)
    train, val = train_val_folders(data, eval_transform(resize, crop))
    ft = extract_features(model, eval_loader(train, 4, 0), "cpu")
    fv = extract_features(model, eval_loader(val, 4, 0), "cpu")
    return knn_classifier_reference(ft, torch.tensor(train.targets), fv, torch.tensor(val.targets), 13, 0.07, 3)


def test_monitor_records_at_the_right_epochs(tmp_path):
    from dino_fast.train.loop import train
    data = _monitor_set(tmp_path / "mon")
    out = tmp_path / "run"
    cfg = resolve("demo", {**TINY, "output_dir": str(out), "monitor_knn": data, "monitor_every": 2})
    summary = train(cfg)
    mon = _records(out, "monitor")
    # every 2 epochs (after epoch index 1) and after the last epoch (index 2)
    assert [r["epoch"] for r in mon] == [1, 2]
    assert [r["it"] for r in mon] == [8, 12]                        # 4 steps per epoch
    assert all(r["monitor_knn_k"] == 13 for r in mon)               # 20-NN capped at the 13 train images
    assert summary["monitor"] == mon
    # the last record is the k-NN of the final checkpoint's teacher, computed independently
    top1, top5 = _reference_knn(str(out / "checkpoint.pth"), data)
    assert mon[-1]["monitor_knn_top1"] == pytest.approx(top1) and mon[-1]["monitor_knn_top5"] == pytest.approx(top5)
    with Image.open(out / "loss_curve.png") as im:                  # loss panel + k-NN panel
        assert im.size == (800, 960)

    # --monitor_every 1: one record per epoch
    cfg = resolve("demo", {**TINY, "epochs": 2, "output_dir": str(tmp_path / "every1"), "monitor_knn": data})
    train(cfg)
    assert [r["epoch"] for r in _records(tmp_path / "every1", "monitor")] == [0, 1]


def test_monitor_config_errors(tmp_path):
    from dino_fast.train.config import ConfigError
    with pytest.raises(ConfigError, match="needs train/ and val/"):
        resolve("demo", {**TINY, "output_dir": str(tmp_path), "monitor_knn": str(tmp_path)})
    with pytest.raises(ConfigError, match="--monitor_every must be >= 1"):
        resolve("demo", {**TINY, "output_dir": str(tmp_path), "monitor_every": 0})


def _two_process_rank(rank, world, data, out):
    """(1) An FSDP2-sharded teacher (MultiCropWrapper) and the monitor's sharded, padded,
    all-gathered features, saved for the comparison with one process; (2) a 2-epoch
    training run with the monitor on."""
    from dino_fast.eval.monitor import KnnMonitor
    from dino_fast.train.build import build_pair, shard
    from dino_fast.train.loop import train
    torch.set_num_threads(1)
    cfg = resolve("demo", {**TINY, "output_dir": out})
    torch.manual_seed(0)
    _, teacher = build_pair(cfg)
    plain = [p.detach().clone() for p in teacher.parameters()]
    mon = KnnMonitor(data, 1, crop=16, rank=rank, world_size=world, batch_size=3)
    sharded = shard(teacher, world, torch.device("cpu"), None, teacher=True)
    feats = {n: mon._gather(mon._features(sharded, mon.images[n], contextlib.nullcontext), mon.sizes[n])
             for n in ("train", "val")}
    rec = mon.evaluate(sharded, epoch=0, it=0)
    if rank == 0:
        torch.save({"feats": feats, "rec": rec, "plain": plain}, os.path.join(out, "sharded.pt"))
    cfg = resolve("demo", {**TINY, "epochs": 2, "batch_size_per_gpu": TINY["batch_size_per_gpu"] // world,
                           "output_dir": os.path.join(out, "run"), "monitor_knn": data, "monitor_every": 1})
    train(cfg)


def test_two_processes_sharded_features_and_run(tmp_path):
    from dino_fast.eval.monitor import KnnMonitor
    from dino_fast.train.build import build_pair
    data = _monitor_set(tmp_path / "mon")
    out = tmp_path / "out"
    out.mkdir()
    run_distributed(_two_process_rank, data, str(out), world_size=2)
    # (1) the sharded features (13 train / 7 val images: both shards padded) equal one process's
    got = torch.load(out / "sharded.pt", weights_only=False)
    torch.manual_seed(0)
    _, teacher = build_pair(resolve("demo", {**TINY, "output_dir": str(out)}))
    for p, q in zip(teacher.parameters(), got["plain"]):
        assert torch.equal(p, q)                                    # the same initial teacher
    mon = KnnMonitor(data, 1, crop=16, batch_size=5)
    for name, n in (("train", 13), ("val", 7)):
        want = mon._features(teacher, mon.images[name], contextlib.nullcontext)   # (n, D) in dataset order
        assert got["feats"][name].shape == (n, 192)
        torch.testing.assert_close(got["feats"][name], want, rtol=1e-5, atol=1e-5)
    rec = mon.evaluate(teacher, epoch=0, it=0)
    assert (got["rec"]["monitor_knn_top1"], got["rec"]["monitor_knn_top5"]) == \
        (rec["monitor_knn_top1"], rec["monitor_knn_top5"])
    # (2) the 2-process run logged one record per epoch (and did not stall at the collectives)
    mon_recs = _records(out / "run", "monitor")
    assert [r["epoch"] for r in mon_recs] == [0, 1] and all(0 <= r["monitor_knn_top1"] <= 100 for r in mon_recs)
