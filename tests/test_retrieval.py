"""Retrieval: average precision against hand-computed values and a literal
port of revisitop's compute_map, the Easy/Medium/Hard ground-truth handling
(junk ignored), plain class-as-relevance retrieval, and end to end on
scikit-image photographs: transformed copies are found with an
identity-like descriptor (mAP 100) and random features sit at chance; the
`dino-fast retrieval` command on a fake revisited-layout dataset."""
from __future__ import annotations

import json
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval.retrieval import (class_retrieval, compute_ap, compute_map, rank_database, revisited_evaluate,
                                      split_gnd)
from tests._photos import jpeg, photos, save, thumb_feature, tiny_vit_checkpoint


def test_trapezoid_ap_by_hand():
    # positives at positions 0, 2, 5 of the ranking, 3 positives in all:
    # j=0,r=0: (1 + 1)/2/3;  j=1,r=2: (1/2 + 2/3)/2/3;  j=2,r=5: (2/5 + 3/6)/2/3  -> 61/90
    assert compute_ap(np.array([0, 2, 5]), 3) == pytest.approx(float(Fraction(61, 90)), abs=1e-12)
    # a 4th positive never retrieved: the same area over 4 recall steps
    assert compute_ap(np.array([0, 2, 5]), 4) == pytest.approx(float(Fraction(61, 120)), abs=1e-12)
    assert compute_ap(np.array([0]), 1) == 1.0
    assert compute_ap(np.array([3]), 1) == pytest.approx((0 + 1 / 4) / 2)   # p0 = 0/3, p1 = 1/4


def _revisitop_compute_map(ranks, gnd, kappas):
    """revisitop python/evaluate.py compute_map, line for line (independent reference)."""
    map_, nq = 0.0, len(gnd)
    aps, pr, prs, nempty = np.zeros(nq), np.zeros(len(kappas)), np.zeros((nq, len(kappas))), 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i], prs[i, :] = float("nan"), float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        for j in np.arange(len(pos)):
            rank = pos[j]
            p0 = 1.0 if rank == 0 else float(j) / rank
            ap += (p0 + float(j + 1) / (rank + 1)) * (1.0 / len(qgnd)) / 2.0
        map_ += ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return map_ / (nq - nempty), aps, pr / (nq - nempty), prs


def test_medium_and_hard_splits_by_hand():
    # database 0..5; query 0 ranks them [3, 1, 4, 0, 5, 2]: easy e0=3 e1=5, hard h0=4, junk j0=1.
    # query 1 has no positive in any split and is left out of every mean.
    ranks = np.array([[3, 0], [1, 1], [4, 2], [0, 3], [5, 4], [2, 5]])
    gnd = [{"bbx": (0, 0, 1, 1), "easy": [3, 5], "hard": [4], "junk": [1]},
           {"bbx": (0, 0, 1, 1), "easy": [], "hard": [], "junk": [0]}]
    # Medium: positives e0, h0, e1; junk j0 removed -> positions 0, 1, 3:
    #   1/3 + (1 + 1)/2/3 + (2/3 + 3/4)/2/3 = 65/72;  mP@1 = 1, mP@5: k' = min(4, 5) = 4 -> 3/4
    med = compute_map(ranks, split_gnd(gnd, "medium"), ks=[1, 5])
    assert med["map"] == pytest.approx(65 / 72, abs=1e-12)
    assert med["mpr"].tolist() == pytest.approx([1.0, 0.75])
    assert np.isnan(med["aps"][1])
    # Hard: positive h0 at 2, junk + easy (3, 1) ranked before it -> position 0 -> AP 1
    assert compute_map(ranks, split_gnd(gnd, "hard"))["map"] == pytest.approx(1.0)
    # Easy: e0 at 0, e1 at 4 - 2 junk (1, 4) = 2 -> (1 + 1)/2/2 + (1/2 + 2/3)/2/2 = 19/24
    assert compute_map(ranks, split_gnd(gnd, "easy"))["map"] == pytest.approx(19 / 24, abs=1e-12)
    res = revisited_evaluate(ranks, gnd, (1, 5), ("medium", "hard"))
    assert res["medium"]["map"] == pytest.approx(100 * 65 / 72) and res["hard"]["map"] == pytest.approx(100.0)


@pytest.mark.parametrize("seed", range(3))
def test_compute_map_matches_revisitop(seed):
    rng = np.random.default_rng(seed)
    n_db, n_q = 40, 9
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for q in range(n_q):
        ids = rng.permutation(n_db)
        ne, nh, nj = rng.integers(0, 5, size=3)
        gnd.append({"bbx": (0, 0, 1, 1), "easy": ids[:ne], "hard": ids[ne:ne + nh], "junk": ids[ne + nh:ne + nh + nj]})
    gnd[0] = {**gnd[0], "easy": [3], "hard": [7]}  # at least one query with positives
    for split in ("easy", "medium", "hard"):
        g = split_gnd(gnd, split)
        if all(len(x["ok"]) == 0 for x in g):
            continue
        ours = compute_map(ranks, g, [1, 5, 10])
        ref_map, ref_aps, ref_pr, ref_prs = _revisitop_compute_map(ranks, g, [1, 5, 10])
        assert ours["map"] == pytest.approx(ref_map, abs=1e-12)
        np.testing.assert_allclose(ours["aps"], ref_aps, atol=1e-12)
        np.testing.assert_allclose(ours["mpr"], ref_pr, atol=1e-12)


def test_class_retrieval_by_hand():
    # query at angle 0; database at 10, 20, 30, 40 degrees with classes 1, 0, 1, 0:
    # relevant at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 1/2; R@1 = 0, R@2 = 1; P@2 = 1/2
    ang = torch.tensor([10.0, 20.0, 30.0, 40.0]).deg2rad()
    db = torch.stack([ang.cos(), ang.sin()], 1)
    res = class_retrieval(db, torch.tensor([1, 0, 1, 0]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ks=(1, 2, 4))
    assert res["map"] == pytest.approx(50.0)
    assert res["recall@k"] == {1: 0.0, 2: 100.0, 4: 100.0}
    assert res["precision@k"][2] == pytest.approx(50.0) and res["precision@k"][4] == pytest.approx(50.0)
    # leave-one-out: each item's one same-class partner is 20 degrees away; it ranks 2nd for the
    # end items (10, 40: one item in between) and 3rd for the middle ones (two items 10 degrees away)
    loo = class_retrieval(db, torch.tensor([1, 0, 1, 0]), db, torch.tensor([1, 0, 1, 0]), ks=(1,), exclude_self=True)
    assert loo["map"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert loo["recall@k"][1] == 0.0


def _copies(images):
    """Transformed copies: JPEG q30, brightness x0.8 + 12, rescaled to 3/4."""
    out = []
    for a in images:
        b = np.clip(a.astype(np.float64) * 0.8 + 12, 0, 255).astype(np.uint8)
        b = np.asarray(Image.fromarray(b).resize((a.shape[1] * 3 // 4, a.shape[0] * 3 // 4), Image.BICUBIC))
        out.append(jpeg(b, 30))
    return out


def _chance_standard_ap(n):      # one positive uniformly placed among n: E[1/rank]
    return sum(1 / r for r in range(1, n + 1)) / n


def _chance_trapezoid_ap(n):     # one positive: 1 at rank 0, 1/(2(r+1)) at 0-based rank r > 0
    return (1 + sum(1 / (2 * (r + 1)) for r in range(1, n))) / n


def test_copies_found_by_identity_like_feature_and_random_is_chance():
    db_imgs = photos(12, (96, 80))
    q_imgs = _copies(db_imgs)
    db = torch.stack([thumb_feature(a) for a in db_imgs])
    q = torch.stack([thumb_feature(a) for a in q_imgs])
    labels = torch.arange(12)
    res = class_retrieval(db, labels, q, labels, ks=(1, 5))
    assert res["map"] == pytest.approx(100.0) and res["recall@k"][1] == pytest.approx(100.0)
    gnd = [{"bbx": (0, 0, 1, 1), "easy": [i], "hard": [], "junk": []} for i in range(12)]
    assert revisited_evaluate(rank_database(db, q), gnd, (1,), ("medium",))["medium"]["map"] == pytest.approx(100.0)
    # random features: mean AP over many draws at the analytic chance level
    g = torch.Generator().manual_seed(0)
    maps, rmaps = [], []
    for _ in range(300):
        rd = F.normalize(torch.randn(12, 16, generator=g), dim=1)
        rq = F.normalize(torch.randn(12, 16, generator=g), dim=1)
        maps.append(class_retrieval(rd, labels, rq, labels)["map"] / 100)
        rmaps.append(revisited_evaluate(rank_database(rd, rq), gnd, (1,), ("medium",))["medium"]["map"] / 100)
    assert np.mean(maps) == pytest.approx(_chance_standard_ap(12), abs=0.015)
    assert np.mean(rmaps) == pytest.approx(_chance_trapezoid_ap(12), abs=0.015)


def _fake_revisited(root, images, queries):
    """roxford5k layout: jpg/<name>.jpg and gnd_roxford5k.pkl. queries: list of
    (db index pasted into a noise canvas, gnd dict without bbx)."""
    ds = root / "roxford5k"
    rng = np.random.default_rng(0)
    imlist = [f"db_{i:02d}" for i in range(len(images))]
    for name, a in zip(imlist, images):
        save(a, ds / "jpg" / f"{name}.jpg", quality=100)
    qimlist, gnd = [], []
    for j, (src, g) in enumerate(queries):
        a = images[src]
        canvas = (rng.random((a.shape[0] + 48, a.shape[1] + 64, 3)) * 255).astype(np.uint8)
        y0, x0 = 16, 32                                   # multiples of 16: the JPEG blocks line up
        canvas[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
        save(canvas, ds / "jpg" / f"query_{j}.jpg", quality=100)
        qimlist.append(f"query_{j}")
        gnd.append({"bbx": [x0, y0, x0 + a.shape[1], y0 + a.shape[0]], **g})
    with open(ds / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return ds


def test_retrieval_command_on_revisited_layout(tmp_path, capsys):
    from dino_fast.cli import main
    from dino_fast.eval.image_list import ImageListDataset
    from dino_fast.eval.revisitop import load_revisited

    images = photos(8, (64, 48))
    queries = [(0, {"easy": [0], "hard": [], "junk": [5]}),
               (3, {"easy": [], "hard": [3], "junk": [1]}),
               (6, {"easy": [6], "hard": [2], "junk": []})]   # 2 is not the query's photo: AP < 1 in both splits
    _fake_revisited(tmp_path, images, queries)
    ds = load_revisited(str(tmp_path), "roxford5k")
    crop, _ = ImageListDataset(ds.query_paths(), None, ds.query_boxes())[0]
    assert crop.size == (64, 48)                         # the query is cut to its bounding box
    ck = tmp_path / "ck.pth"
    tiny_vit_checkpoint(ck)
    out = tmp_path / "r.json"
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path), "--dataset", "roxford5k",
                 "--imsize", "64", "--device", "cpu", "--num_workers", "0", "--output", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    # the cropped query is the database photo (JPEG q100 twice): it ranks first among 8 photos
    # medium: q0 AP 1, q1 AP 1 (hard counts), q2: positives 6 (rank 0) and 2 (somewhere) -> below 1
    med, hard = res["medium"]["map"], res["hard"]["map"]
    assert 100 * 2 / 3 < med < 100.0
    assert hard < 100.0 and json.loads(out.read_text())["queries"] == 3
    text = capsys.readouterr().out
    assert "roxford5k medium: mAP" in text and "results written to" in text
    # the whole query image (the photo inside random noise) is a much worse query than its box
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path), "--dataset", "roxford5k",
                 "--imsize", "64", "--device", "cpu", "--num_workers", "0", "--output", str(out),
                 "--crop_queries", "false"]) == 0
    assert json.loads(out.read_text())["results"]["medium"]["map"] < med - 20


def test_retrieval_command_errors(tmp_path, capsys):
    from dino_fast.cli import main
    ck = tmp_path / "ck.pth"
    tiny_vit_checkpoint(ck)
    (tmp_path / "rparis6k").mkdir()
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path), "--dataset", "rparis6k",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "gnd_rparis6k.pkl: missing" in err and "jpg/" in err
    ds = tmp_path / "rparis6k"
    with open(ds / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 4, 4], "easy": [0], "hard": [],
                                                                 "junk": []}]}, f)
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path), "--dataset", "rparis6k",
                 "--device", "cpu"]) == 2
    assert "rparis6k/jpg: missing" in capsys.readouterr().err
    (ds / "jpg").mkdir()
    save(photos(1, (32, 32))[0], ds / "jpg" / "a.jpg")
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path), "--dataset", "rparis6k",
                 "--device", "cpu"]) == 2
    assert "q.jpg: missing" in capsys.readouterr().err
    with open(ds / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [0, 0, 4, 4], "easy": [3], "hard": []}]}, f)
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path), "--dataset", "rparis6k",
                 "--device", "cpu"]) == 2
    assert "gnd[0] lacks ['junk']" in capsys.readouterr().err


def test_retrieval_command_on_an_image_folder(tmp_path):
    from dino_fast.cli import main
    # 3 classes x 3 images: each class holds copies (JPEG / brightness) of one photograph
    for c, a in enumerate(photos(3, (48, 48))):
        for k, b in enumerate([a] + _copies([a, a])):
            save(b, tmp_path / "data" / f"class{c}" / f"{k}.png")
    ck = tmp_path / "ck.pth"
    tiny_vit_checkpoint(ck)
    out = tmp_path / "f.json"
    assert main(["retrieval", "--checkpoint", str(ck), "--data_path", str(tmp_path / "data"), "--dataset", "folder",
                 "--resize", "48", "--crop", "48", "--device", "cpu", "--num_workers", "0", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "each image queries the others" and res["results"]["queries"] == 9
    # near-identical copies of one photo are closer to each other than to other photos, even at random init
    assert res["results"]["recall@k"]["1"] == pytest.approx(100.0)
