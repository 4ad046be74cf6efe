"""Copy detection: PCA whitening against a NumPy float64 port of the
reference utils.PCA, GeM pooling against its formula, the Copydays layout
and positives, top-k AP, and end to end on scikit-image photographs with
JPEG-compressed, cropped and recoloured copies: an identity-like
descriptor finds every copy (mAP 100), random features sit at chance; the
`dino-fast copydetect` command with whitening and distractors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval.copydetect import copy_detection, load_copydays, positives, topk_ap
from dino_fast.eval.dense import gem
from dino_fast.eval.whitening import PCAWhitening
from tests._photos import jpeg, photos, save, thumb_feature, tiny_vit_checkpoint


def _reference_pca(features_for_whitening: np.ndarray, x: np.ndarray) -> np.ndarray:
    """eval_copy_detection.py + utils.PCA(whit=0.5), in float64 NumPy."""
    mean = features_for_whitening.mean(0)
    cov = features_for_whitening.T @ features_for_whitening / features_for_whitening.shape[0]
    d, v = np.linalg.eigh(cov)
    eps = d.max() * 1e-5
    d[d < eps] = eps
    idx = np.argsort(d)[::-1][:x.shape[1]]
    d, v = d[idx], v[:, idx]
    dvt = np.diag(1.0 / d ** 0.5) @ v.T
    return (dvt @ (x - mean).T).T


def test_whitening_matches_reference_pca():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g)
    train = torch.randn(300, 12, generator=g) @ mix + 3.0          # correlated, far from zero mean
    x = torch.randn(7, 12, generator=g) @ mix + 3.0
    ours = PCAWhitening().fit(train).apply(x.double())
    ref = _reference_pca(train.double().numpy(), x.double().numpy())
    # eigenvectors are defined up to sign: compare per output dimension up to sign
    signs = np.sign((ours.numpy() * ref).sum(0))
    np.testing.assert_allclose(ours.numpy() * signs, ref, rtol=1e-8, atol=1e-8)


def test_centered_whitening_gives_identity_covariance():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 5.0
    w = PCAWhitening(centered=True).fit(train).apply(train.double())
    cov = (w - w.mean(0)).T @ (w - w.mean(0)) / w.shape[0]
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)
    assert PCAWhitening(dim=2, centered=True).fit(train).apply(train).shape == (500, 2)


def test_gem_is_the_generalised_mean():
    x = torch.rand(2, 3, 5, 7) + 0.1
    want = (x.double() ** 4).mean(dim=(1, 2)) ** 0.25
    torch.testing.assert_close(gem(x, 4.0).double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)   # p = 1: average pooling


def test_topk_ap_by_hand():
    # query 0: positive 4 at rank 1 of [9, 4, 2] -> (0 + 1/2)/2 = 1/4
    # query 1: positives {2, 7}: 2 at rank 0, 7 not in the first 3 -> (1 + 1)/2/2 = 1/2
    idx = np.array([[9, 4, 2], [2, 5, 6]])
    np.testing.assert_allclose(topk_ap(idx, [[4], [2, 7]]), [0.25, 0.5])


def _recolour(a: np.ndarray) -> np.ndarray:
    """Swap colour channels, darken, add a warm tint (a colour attack)."""
    b = a[..., [2, 0, 1]].astype(np.float64) * 0.7 + np.array([40.0, 10.0, 0.0])
    return np.clip(b, 0, 255).astype(np.uint8)


def _crop(a: np.ndarray, removed: float) -> np.ndarray:
    """Centre crop removing `removed` of the surface (Copydays crops/<percent>)."""
    keep = (1 - removed) ** 0.5
    h, w = a.shape[:2]
    ch, cw = round(h * keep), round(w * keep)
    return a[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]


def _copydays(root, n=8, size=(96, 72)):
    """Copydays layout: originals <10+g>0000.jpg, strong attacks <10+g>0001 / 0002
    (recoloured; recoloured + cropped), jpegqual/10, crops/20 (same names)."""
    imgs = photos(n, size)
    for g, a in enumerate(imgs):
        name = f"{10 + g}0000.jpg"                      # 4-character prefix 10 + g, 00
        save(a, root / "original" / name)
        save(_recolour(a), root / "strong" / name.replace("00.jpg", "01.jpg"))
        save(_recolour(_crop(a, 0.2)), root / "strong" / name.replace("00.jpg", "02.jpg"))
        save(jpeg(a, 10), root / "jpegqual" / "10" / name, quality=95)
        save(_crop(a, 0.2), root / "crops" / "20" / name)
    return imgs


def _thumb_extract(paths):
    return torch.stack([thumb_feature(Image.open(p).convert("RGB")) for p in paths])


def test_layout_and_positives(tmp_path):
    _copydays(tmp_path, n=3)
    layout = load_copydays(str(tmp_path))
    assert layout.originals == ["100000.jpg", "110000.jpg", "120000.jpg"]
    assert layout.query_blocks() == ["original", "strong", "jpegqual/10", "crops/20"]
    assert positives(layout, "strong") == [[0], [0], [1], [1], [2], [2]]   # by the 4-character prefix
    assert positives(layout, "crops/20") == [[0], [1], [2]]


def test_copies_found_by_identity_like_feature_and_random_is_chance(tmp_path):
    _copydays(tmp_path / "copydays")
    for i, a in enumerate(photos(14, (64, 64))[8:]):              # other photographs: whitening set
        save(a, tmp_path / "whiten" / f"w{i}.jpg")
    layout = load_copydays(str(tmp_path / "copydays"))
    whit = sorted(str(p) for p in (tmp_path / "whiten").iterdir())
    res = copy_detection(layout, _thumb_extract, topk=20)
    assert res["blocks"] == {"original": 100.0, "strong": 100.0, "jpegqual/10": 100.0, "crops/20": 100.0}
    res_w = copy_detection(layout, _thumb_extract, whitening_paths=whit, centered_whitening=True)
    assert res_w["blocks"]["original"] == 100.0 and res_w["whitening"]["images"] == 6
    # random features: at the chance level of one positive among 8 (strong: 2 queries per original,
    # same chance). Trapezoid AP of a uniformly placed single positive: (1 + sum_{r=1}^{7} 1/(2(r+1))) / 8
    chance = (1 + sum(1 / (2 * (r + 1)) for r in range(1, 8))) / 8
    g = torch.Generator().manual_seed(0)
    maps = [copy_detection(layout, lambda paths: torch.randn(len(paths), 16, generator=g))["mean_copies"] / 100
            for _ in range(150)]
    assert np.mean(maps) == pytest.approx(chance, abs=0.02)


def test_copydetect_command(tmp_path, capsys):
    from dino_fast.cli import main
    _copydays(tmp_path / "copydays", n=6, size=(64, 48))
    for i, a in enumerate(photos(16, (48, 48))[6:]):
        save(a, tmp_path / "whiten" / f"w{i}.jpg")
        save(np.ascontiguousarray(a[::-1]), tmp_path / "distract" / f"d{i}.jpg")
    ck = tmp_path / "ck.pth"
    tiny_vit_checkpoint(ck)
    out = tmp_path / "cd.json"
    args = ["copydetect", "--checkpoint", str(ck), "--data_path", str(tmp_path / "copydays"), "--imsize", "48",
            "--device", "cpu", "--num_workers", "0", "--output", str(out)]
    assert main(args + ["--whitening_path", str(tmp_path / "whiten"), "--distractors_path",
                        str(tmp_path / "distract")]) == 0
    res = json.loads(out.read_text())
    assert res["database"] == 6 + 10 and res["whitening"]["images"] == 10
    assert set(res["blocks"]) == {"original", "strong", "jpegqual/10", "crops/20"}
    assert res["blocks"]["original"] == 100.0      # a query identical to its original ranks it first
    assert "mean over the copy blocks" in capsys.readouterr().out
    # layout errors name the folder
    assert main(["copydetect", "--checkpoint", str(ck), "--data_path", str(tmp_path / "whiten"),
                 "--device", "cpu"]) == 2
    assert "whiten/original: missing" in capsys.readouterr().err
    save(photos(1, (32, 32))[0], tmp_path / "copydays" / "jpegqual" / "10" / "999999.jpg")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "jpegqual/10/999999.jpg: no matching original" in err and "original/999999.jpg" in err
