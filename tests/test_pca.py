"""PCA maps: components and variances against NumPy's SVD, the foreground
mask from the first component on images with a known object (a
photograph's texture pasted on a plain background), the orientation of
the first component, and the `dino-fast pca` command's PNG grid and JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval.pca import pca_maps, principal_components
from tests._photos import photo, tiny_vit_checkpoint


def test_components_match_numpy_svd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g) @ torch.randn(10, 10, generator=g) + 2.0
    mean, comps, var = principal_components(x, 3)
    xc = x.double().numpy() - x.double().numpy().mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(var.numpy(), s[:3] ** 2 / (x.shape[0] - 1), rtol=1e-10)
    for k in range(3):   # unit vectors equal up to sign
        assert abs(float(comps[k].numpy() @ vt[k])) == pytest.approx(1.0, abs=1e-10)


def _object_images():
    """(images (H, W, 3), object masks (H, W)) of three 64 x 96 pictures: a plain
    grey background with noise and a textured disk cut from `chelsea` (cat fur)."""
    rng = np.random.default_rng(0)
    tex = photo("chelsea", (96, 64))
    yy, xx = np.mgrid[:64, :96]
    out = []
    for cy, cx, r in ((32, 48, 20), (24, 30, 16), (40, 64, 18)):
        img = np.clip(128 + rng.normal(0, 3, (64, 96, 3)), 0, 255).astype(np.uint8)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[m] = tex[m]
        out.append((img, m))
    return out


def _patch_pixels(img: np.ndarray, p: int) -> torch.Tensor:
    x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 255
    h, w = img.shape[0] // p, img.shape[1] // p
    return F.unfold(x, p, stride=p)[0].T.reshape(h, w, -1)        # (h, w, 3p^2)


def test_foreground_from_first_component():
    p = 4
    data = _object_images()
    maps = pca_maps([_patch_pixels(img, p) for img, _ in data], threshold=0.0)
    for (img, m), fg, first in zip(data, maps.foreground, maps.first):
        cover = torch.from_numpy(m.reshape(16, p, 24, p).mean(axis=(1, 3)))      # object share per patch
        inside, outside = cover == 1, cover == 0                                  # patches not on the rim
        assert float(fg[inside].float().mean()) > 0.9                             # measured 0.96-0.97
        assert float((~fg[outside]).float().mean()) > 0.98                        # measured 1.0
        border = torch.zeros_like(fg)
        border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
        assert float(first[border].mean()) < float(first[~border].mean())         # oriented: borders low
    assert all(r.shape == (16, 24, 3) and float(r.min()) >= 0 and float(r.max()) <= 1 for r in maps.rgb)
    # the second PCA colours the foreground only; the background stays black
    assert all(float(c[~f].abs().max()) == 0.0 and float(c[f].max()) > 0 for c, f in zip(maps.fg_rgb, maps.foreground))
    assert sum(maps.variance_ratio) <= 1.0 and maps.variance_ratio[0] >= maps.variance_ratio[1]


def test_pca_command_writes_grid(tmp_path, capsys):
    from dino_fast.cli import main
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (img, _) in enumerate(_object_images()):
        Image.fromarray(img).save(imgs / f"im{i}.png")
    ck = tmp_path / "ck.pth"
    tiny_vit_checkpoint(ck)
    out = tmp_path / "out"
    assert main(["pca", "--checkpoint", str(ck), "--image", str(imgs), "--output_dir", str(out),
                 "--image_size", "64", "96", "--tile", "64", "--device", "cpu"]) == 0
    info = json.loads((out / "pca.json").read_text())
    assert set(info["images"]) == {"im0", "im1", "im2"} and info["images"]["im0"]["grid"] == [8, 12]
    assert all(0.0 <= v["foreground_share"] <= 1.0 for v in info["images"].values())
    with Image.open(out / "im0.png") as row:
        assert row.size == (4 * 96 + 3 * 4, 64)                  # input | PCA | foreground | foreground PCA
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 96 + 3 * 4, 3 * 64 + 2 * 4)
    assert "components 1-3 explain" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp*"))
    assert main(["pca", "--checkpoint", str(ck), "--image", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "none: no such image file or folder" in capsys.readouterr().err
