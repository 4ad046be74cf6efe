"""`dino-fast knn` on a train set smaller than a k: that k is clipped to the train-set size with a
warning (the default k list includes 200), and the clipped k's numbers are those of a brute-force
k-NN with k = the train-set size."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dino_fast.eval.knn import clip_ks
from tests.test_knn import brute_force_accuracy, brute_force_ranks, tiny_checkpoint, tiny_dataset  # noqa: F401


def test_clip_ks():
    assert clip_ks([10, 20, 100, 200], 500) == ([10, 20, 100, 200], None)
    ks, warning = clip_ks([200, 10, 20, 100], 60)
    assert ks == [10, 20, 60]
    assert warning.startswith("100 200 exceed the 60 train images: using k = 10 20 60")
    assert clip_ks([200], 7)[0] == [7]


def test_knn_command_clips_k_to_the_train_set(tiny_dataset, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from dino_fast.cli import main
    from dino_fast.eval.data import eval_transform, train_val_folders
    ckpt, model = tiny_checkpoint
    out = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", str(ckpt), "--data_path", str(tiny_dataset), "--resize", "32", "--crop", "32",
                 "--num_workers", "0", "--batch_size", "32", "--device", "cpu", "--cache_dir", "none",
                 "--output", str(out)]) == 0                       # default k: 10 20 100 200
    err = capsys.readouterr().err
    assert "dino-fast knn: warning: --nb_knn 100 200 exceed the 60 train images: using k = 10 20 60" in err
    res = json.loads(out.read_text())["results"]
    assert sorted(res, key=int) == ["10", "20", "60"]
    tr, va = train_val_folders(str(tiny_dataset), eval_transform(32, 32))
    with torch.no_grad():
        feats = lambda ds: F.normalize(model.eval()(torch.stack([ds[i][0] for i in range(len(ds))])), dim=1)  # noqa: E731
        ftr, fva = feats(tr), feats(va)
    t1, t5 = brute_force_accuracy(brute_force_ranks(ftr, torch.tensor(tr.targets), fva, 60, 0.07, 3),
                                  torch.tensor(va.targets), 60)
    assert (res["60"]["top1"], res["60"]["top5"]) == (pytest.approx(t1, abs=1e-6), pytest.approx(t5, abs=1e-6))
