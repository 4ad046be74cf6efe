"""Weighted k-NN: chunked search against an independent brute-force
computation (full similarity matrix, dense one-hot vote), the reference
eval_knn.py loop, the feature cache and the `dino-fast knn` command."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval.knn import (knn_classifier, knn_classifier_reference, knn_evaluate, knn_neighbors,
                                knn_predict)


def brute_force_ranks(train_f, train_y, test_f, k, T, C):
    """Independent k-NN: full (M, N) similarity matrix, full argsort, votes as
    a dense (M, N) weight matrix times a one-hot (N, C) label matrix."""
    sim = test_f.double() @ train_f.double().T                          # (M, N)
    order = torch.argsort(sim, dim=1, descending=True)[:, :k]           # (M, k)
    w = torch.zeros_like(sim).scatter_(1, order, sim.gather(1, order).div(T).exp())
    votes = w @ F.one_hot(train_y, C).double()                          # (M, C)
    return votes.sort(dim=1, descending=True, stable=True).indices


def brute_force_accuracy(ranks, test_y, k):
    correct = ranks.eq(test_y[:, None])
    n5 = min(5, k, ranks.shape[1])
    return (correct[:, 0].double().mean().item() * 100, correct[:, :n5].any(1).double().mean().item() * 100)


def _features(n, d, c, seed):
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(1234))  # shared by train and test
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = F.normalize(centers[y] + 1.5 * torch.randn(n, d, generator=g), dim=1)
    return x, y


@pytest.mark.parametrize("k", [1, 3, 10, 20, 37])
@pytest.mark.parametrize("chunks", [dict(test_chunk=7, train_chunk=13), dict(test_chunk=64, train_chunk=1000),
                                    dict(block_bytes=4 * 5 * 29)])
def test_knn_matches_brute_force(k, chunks):
    C = 11  # not a power of two, > 5
    train_f, train_y = _features(203, 24, C, 0)   # 203, 53: no chunk size divides them
    test_f, test_y = _features(53, 24, C, 1)
    ranks = knn_predict(train_f, train_y, test_f, k, 0.07, C, **chunks)
    expect = brute_force_ranks(train_f, train_y, test_f, k, 0.07, C)
    n = min(5, k)
    assert torch.equal(ranks[:, :n], expect[:, :n])          # predictions identical, rank by rank
    top1, top5 = knn_classifier(train_f, train_y, test_f, test_y, k, 0.07, C, **chunks)
    assert (top1, top5) == pytest.approx(brute_force_accuracy(expect, test_y, k), abs=1e-9)


def test_neighbors_equal_full_topk():
    train_f, _ = _features(301, 16, 5, 2)
    test_f, _ = _features(29, 16, 5, 3)
    sim, idx = knn_neighbors(train_f, test_f, 25, test_chunk=4, train_chunk=17)
    full = test_f @ train_f.T
    ref_sim, ref_idx = full.topk(25, dim=1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sim, ref_sim, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [2, 20])
def test_knn_matches_reference_loop(k):
    """The reference eval_knn.py loop (100 test chunks, one-hot vote) gives the
    same top-1/top-5; k < 5 uses only the first k ranks for top-5 as there."""
    C = 7
    train_f, train_y = _features(400, 32, C, 4)
    test_f, test_y = _features(250, 32, C, 5)
    ours = knn_classifier(train_f, train_y, test_f, test_y, k, 0.07, C, test_chunk=33, train_chunk=97)
    ref = knn_classifier_reference(train_f, train_y, test_f, test_y, k, 0.07, C)
    assert ours == pytest.approx(ref, abs=1e-9)
    # a stated value: well-separated clusters are found by 20 neighbours
    assert knn_classifier(train_f, train_y, test_f, test_y, 20, 0.07, C)[0] > 80.0


def test_knn_evaluate_several_k_one_search():
    C = 10
    train_f, train_y = _features(300, 20, C, 6)
    test_f, test_y = _features(90, 20, C, 7)
    res = knn_evaluate(train_f, train_y, test_f, test_y, (10, 20, 100, 200), 0.07, C)
    for k, acc in res.items():
        assert acc == pytest.approx(brute_force_accuracy(
            brute_force_ranks(train_f, train_y, test_f, k, 0.07, C), test_y, k), abs=1e-9)


def test_knn_clear_errors():
    f, y = _features(10, 8, 3, 0)
    with pytest.raises(ValueError, match="k=11"):
        knn_classifier(f, y, f, y, 11, 0.07, 3)
    with pytest.raises(ValueError, match="feature dims differ"):
        knn_classifier(f, y, f[:, :4], y, 2, 0.07, 3)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_classifier(f, y, f, y, 2, 0.07, 2)


# ---------------------------------------------------------------- the command
def _image_folder(root, x, y, classes=3):
    for i, (img, label) in enumerate(zip(x, y)):
        d = os.path.join(root, f"class{int(label)}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{i}.png"))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    demo = np.load(os.path.join(os.path.dirname(__import__("dino_fast").__file__), "data", "fashion_mnist_demo.npz"))
    keep = lambda y: np.flatnonzero(y < 3)  # noqa: E731
    tr, te = keep(demo["y_train"])[:60], keep(demo["y_test"])[:24]
    _image_folder(root / "train", demo["x_train"][tr], demo["y_train"][tr])
    _image_folder(root / "val", demo["x_test"][te], demo["y_test"][te])
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import argparse
    from dino_fast.model import vit_tiny
    m = vit_tiny(patch_size=8, depth=2)
    sd = m.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "student": {f"module.backbone.{k}": v for k, v in sd.items()},
                "epoch": 1, "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}, path)
    return path, m


def test_knn_command_and_feature_cache(tiny_dataset, tiny_checkpoint, tmp_path, capsys, caplog):
    from dino_fast.cli import main
    ckpt, model = tiny_checkpoint
    argv = ["knn", "--checkpoint", str(ckpt), "--data_path", str(tiny_dataset), "--nb_knn", "1", "5", "20",
            "--resize", "32", "--crop", "32", "--num_workers", "0", "--batch_size", "16", "--device", "cpu",
            "--cache_dir", str(tmp_path / "cache"), "--output", str(tmp_path / "knn.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "   20" in out
    import json
    res = json.loads((tmp_path / "knn.json").read_text())["results"]
    # the same numbers from an independent path: the model run by hand + brute force
    from dino_fast.eval.data import eval_transform, train_val_folders
    tr, va = train_val_folders(str(tiny_dataset), eval_transform(32, 32))
    with torch.no_grad():
        feats = lambda ds: F.normalize(model.eval()(torch.stack([ds[i][0] for i in range(len(ds))])), dim=1)  # noqa: E731
        ftr, fva = feats(tr), feats(va)
    ytr, yva = torch.tensor(tr.targets), torch.tensor(va.targets)
    for k in (1, 5, 20):
        t1, t5 = brute_force_accuracy(brute_force_ranks(ftr, ytr, fva, k, 0.07, 3), yva, k)
        assert res[str(k)]["top1"] == pytest.approx(t1, abs=1e-6)
        assert res[str(k)]["top5"] == pytest.approx(t5, abs=1e-6)
    # second run: features come from the cache (no extraction)
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 2
    with caplog.at_level(logging.INFO, logger="dino_fast.eval.features"):
        assert main(argv) == 0
    assert sum("features loaded from the cache" in r.message for r in caplog.records) == 2


def test_knn_command_clear_errors(tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    from dino_fast.cli import main
    ckpt, _ = tiny_checkpoint
    base = ["knn", "--device", "cpu", "--num_workers", "0", "--cache_dir", "none"]
    assert main(base + ["--checkpoint", str(tmp_path / "nope.pth"), "--data_path", str(tiny_dataset)]) == 2
    assert "nope.pth: no such checkpoint file" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(ckpt), "--data_path", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(ckpt), "--data_path", str(tiny_dataset), "--patch_size", "16"]) == 2
    assert "patch size 8, not --patch_size 16" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(ckpt), "--data_path", str(tiny_dataset), "--arch", "vit_small"]) == 2
    assert "not --arch vit_small" in capsys.readouterr().err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    assert main(base + ["--checkpoint", str(ckpt), "--data_path", str(tmp_path / "empty")]) == 2
    assert "no class subfolders" in capsys.readouterr().err
