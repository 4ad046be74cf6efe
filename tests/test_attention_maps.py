"""Attention maps: values against timm's own blocks (an independent ViT
implementation holding the same weights), each head sums to 1, the
reference's 60 %-mass threshold, sizes not divisible by the patch, PNGs
written and readable, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.eval.attention import attention_maps, heatmap, prepare_image, threshold_masks
from dino_fast.model import vit_tiny


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = vit_tiny(patch_size=8, depth=2, attention="sdpa").eval()
    with torch.no_grad():  # a non-trivial pos_embed so that interpolation matters
        m.pos_embed.normal_(0, 0.5)
    return m


def _timm_last_cls_attention(model, x):
    """CLS-row attention of the last block computed from timm's model: its
    input captured with a hook, then softmax(q k^T * scale) by hand."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from dino_fast.model.timm_interop import to_timm_state_dict
    t = TimmViT(img_size=x.shape[-1], patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0).eval()
    t.load_state_dict(to_timm_state_dict(model, x.shape[-1]))
    captured = {}
    t.blocks[-1].register_forward_pre_hook(lambda mod, inp: captured.setdefault("x", inp[0]))
    with torch.no_grad():
        t(x)
        blk = t.blocks[-1]
        h = blk.norm1(captured["x"])                                   # (1, L, D)
        B, L, D = h.shape
        nh = blk.attn.num_heads
        qkv = blk.attn.qkv(h).reshape(B, L, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (D // nh) ** -0.5).softmax(-1)  # (1, nh, L, L)
    return attn[0, :, 0]                                               # (nh, L)


def test_maps_match_timm_and_sum_to_one(model):
    x = torch.randn(3, 48, 48)
    maps = attention_maps(model, x, 8, threshold=0.6)
    assert maps.attentions.shape == (3, 6, 6) and maps.masks.shape == (3, 6, 6)
    ref = _timm_last_cls_attention(model, x[None])
    torch.testing.assert_close(maps.cls_self, ref[:, 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps.attentions.reshape(3, -1), ref[:, 1:], rtol=1e-4, atol=1e-6)
    # each head's attention (CLS + patches) sums to 1
    torch.testing.assert_close(maps.attentions.sum((1, 2)) + maps.cls_self, torch.ones(3), rtol=0, atol=1e-5)


def _reference_threshold(attentions, threshold):
    """visualize_attention.py, verbatim loop."""
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(attentions.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


@pytest.mark.parametrize("threshold", [0.6, 0.9, 0.25])
def test_threshold_masks(threshold):
    a = torch.rand(4, 77) ** 3
    m = threshold_masks(a, threshold)
    assert torch.equal(m, _reference_threshold(a.clone(), threshold))
    share = a / a.sum(1, keepdim=True)
    for h in range(4):
        kept, dropped = share[h][m[h]], share[h][~m[h]]
        assert kept.sum() >= threshold - 1e-6                     # keeps at least the mass asked for
        assert kept.sum() - kept.min() < threshold                # and no more patches than needed
        assert dropped.numel() == 0 or kept.min() >= dropped.max()  # the most-attended ones


def test_size_not_divisible_by_patch_and_non_square(model):
    img = Image.fromarray((np.random.default_rng(0).random((61, 45, 3)) * 255).astype(np.uint8))
    x = prepare_image(img, (61, 45), 8, fit="crop")                  # reference: crop the remainder
    assert x.shape == (3, 56, 40)
    maps = attention_maps(model, x, 8)
    assert maps.attentions.shape == (3, 7, 5)
    torch.testing.assert_close(maps.attentions.sum((1, 2)) + maps.cls_self, torch.ones(3), rtol=0, atol=1e-5)
    # the same crop through timm (square only there): compare on a square crop
    y = prepare_image(img, (61, 45), 8, fit="resize")                # resized to the nearest multiples
    assert y.shape == (3, 64, 48)
    assert attention_maps(model, y, 8).attentions.shape == (3, 8, 6)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        attention_maps(model, torch.randn(3, 50, 48), 8)


def test_fused_backend_model_gives_the_same_maps(model):
    """Maps come from get_last_selfattention whatever backend runs the features."""
    m2 = vit_tiny(patch_size=8, depth=2, attention="math").eval()
    m2.load_state_dict(model.state_dict())
    x = torch.randn(3, 40, 56)
    torch.testing.assert_close(attention_maps(model, x, 8).attentions, attention_maps(m2, x, 8).attentions)


def test_heatmap_colors():
    a = torch.zeros(2, 3)
    a[1, 2] = 1.0
    hm = heatmap(a, 4)                                               # (8, 12, 3)
    assert hm.shape == (8, 12, 3)
    assert tuple(hm[5, 9]) == (253, 231, 37) and tuple(hm[0, 0]) == (68, 1, 84)  # viridis max / min


def test_attention_command_writes_pngs(model, tmp_path, capsys):
    from dino_fast.cli import main
    ck = tmp_path / "ck.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, ck)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(imgs / "a.png")
    Image.fromarray((rng.random((33, 41)) * 255).astype(np.uint8), "L").save(imgs / "sub" / "b.jpg")
    out = tmp_path / "out"
    assert main(["attention", "--checkpoint", str(ck), "--image", str(imgs), "--output_dir", str(out),
                 "--image_size", "50", "70", "--device", "cpu"]) == 0
    for name, (h, w) in (("a", (48, 64)), ("sub/b", (48, 64))):
        d = out / name
        files = sorted(p.name for p in d.iterdir())
        assert files == sorted(["img.png", "grid.png"] + [f"attn-head{j}.png" for j in range(3)]
                               + [f"attn-overlay-head{j}.png" for j in range(3)]
                               + [f"mask_th0.6_head{j}.png" for j in range(3)])
        for f in files:
            with Image.open(d / f) as im:
                im.load()
                if f != "grid.png":
                    assert im.size == (w, h) and im.mode == "RGB"
                else:
                    assert im.size == (4 * (w + 4) + 4, 2 * (h + 4) + 4)
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temp files
    capsys.readouterr()
    assert main(["attention", "--checkpoint", str(ck), "--image", str(tmp_path / "nope.png"),
                 "--output_dir", str(out)]) == 2
    assert "nope.png: no such image file or folder" in capsys.readouterr().err
    assert main(["attention", "--checkpoint", str(tmp_path / "missing.pth"), "--image", str(imgs),
                 "--output_dir", str(out)]) == 2
    assert "missing.pth: no such checkpoint file" in capsys.readouterr().err
