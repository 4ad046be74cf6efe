"""Reference checkpoint layouts load strictly and give the reference's outputs;
timm export/import round trip against a real timm model."""
import argparse

import pytest
import torch

import dino_fast.model as dm
import tests.reference_vit as ref
from dino_fast.model.checkpoint import load_reference_checkpoint, load_reference_state_dict, strip_prefixes
from dino_fast.model.timm_interop import from_timm_state_dict, timm_model_name, to_timm, to_timm_state_dict

OUT_DIM = 96


def _reference_pair(seed):
    torch.manual_seed(seed)
    b = ref.vit_small(patch_size=16, depth=2)
    return ref.MultiCropWrapper(b, ref.DINOHead(384, OUT_DIM, hidden_dim=64, bottleneck_dim=32))


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """A file laid out like main_dino.py's checkpoint.pth: DDP student
    (`module.backbone.*`, `module.head.*`), plain teacher (`backbone.*`, `head.*`)."""
    student, teacher = _reference_pair(1), _reference_pair(2)
    ckpt = {
        "student": {"module." + k: v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 7,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=OUT_DIM),
        "dino_loss": {"center": torch.zeros(1, OUT_DIM)},
    }
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save(ckpt, path)
    return path, student.eval(), teacher.eval()


def _ours():
    b = dm.vit_small(patch_size=16, depth=2, attention="math")
    return dm.MultiCropWrapper(b, dm.DINOHead(384, OUT_DIM, hidden_dim=64, bottleneck_dim=32)).eval()


def test_keys_of_reference_checkpoint_have_prefixes(reference_checkpoint):
    path, _, _ = reference_checkpoint
    ck = torch.load(path, weights_only=False)
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ck["student"])
    assert "module.head.last_layer.weight_g" in ck["student"] and "backbone.pos_embed" in ck["teacher"]


@pytest.mark.parametrize("key", ["student", "teacher"])
def test_wrapper_loads_strict_and_matches(reference_checkpoint, key):
    path, student, teacher = reference_checkpoint
    want_model = student if key == "student" else teacher
    ours = _ours()
    res = load_reference_checkpoint(ours, path, key=key, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        want, got = want_model(crops), ours(crops)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the frozen weight_g keeps requires_grad False after loading
    assert ours.head.last_layer.weight_g.requires_grad is False


def test_backbone_and_head_parts(reference_checkpoint):
    path, _, teacher = reference_checkpoint
    sd = load_reference_state_dict(path, key="teacher", part="backbone")
    assert "pos_embed" in sd and not any(k.startswith(("backbone.", "head.", "module.")) for k in sd)
    backbone = dm.vit_small(patch_size=16, depth=2)
    load_reference_checkpoint(backbone, path, key="teacher")
    head = dm.DINOHead(384, OUT_DIM, hidden_dim=64, bottleneck_dim=32)
    load_reference_checkpoint(head, path, key="student")
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        # fp32 round-off only (outputs are O(1) after the final LayerNorm; max difference ~2e-6)
        torch.testing.assert_close(backbone(x), teacher.backbone(x), rtol=1e-5, atol=1e-5)
    ref_head = torch.load(path, weights_only=False)["student"]["module.head.last_layer.weight_v"]
    assert torch.equal(head.last_layer.weight_v, ref_head)


def test_bare_backbone_file_and_compiled_prefix(tmp_path, reference_checkpoint):
    """Released weights (dino_vitsmall16_pretrain.pth) are a bare ViT state dict."""
    _, _, teacher = reference_checkpoint
    path = tmp_path / "dino_vitsmall16_pretrain.pth"
    torch.save(teacher.backbone.state_dict(), path)
    backbone = dm.vit_small(patch_size=16, depth=2)
    load_reference_checkpoint(backbone, path)
    assert torch.equal(backbone.pos_embed, teacher.backbone.pos_embed)
    assert strip_prefixes({"module._orig_mod.norm.weight": 1}) == {"norm.weight": 1}


def test_clear_errors(tmp_path, reference_checkpoint):
    path, _, _ = reference_checkpoint
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_reference_checkpoint(dm.vit_small(depth=2), tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="patch_size"):  # ViT-S/8 weights into a ViT-S/16 checkpoint
        load_reference_checkpoint(dm.vit_small(patch_size=8, depth=2), path)
    with pytest.raises(KeyError, match="'ema'"):
        load_reference_state_dict(path, key="ema")
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_reference_checkpoint(dm.vit_small(depth=2), bad)


def test_timm_round_trip_vit_small_dino():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # the real timm architecture at 224 px; 4 of its 12 blocks keep the test fast on 2 cores
    ours = dm.vit_small(patch_size=16, depth=4, attention="sdpa").eval()
    assert timm_model_name(ours) == "vit_small_patch16_224.dino"
    tm = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, depth=4).eval()
    tm.load_state_dict(to_timm_state_dict(ours), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = ours(x), tm(x)
    assert got.shape == (2, 384) and (got - want).abs().max() <= 1e-5 * want.abs().max()
    # and back: timm weights (a fresh init) into our model
    tm2 = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, depth=4).eval()
    back = dm.vit_small(patch_size=16, depth=4).eval()
    back.load_state_dict(from_timm_state_dict(tm2.state_dict()), strict=True)
    with torch.no_grad():
        want = tm2(x)
        assert (back(x) - want).abs().max() <= 1e-5 * want.abs().max()


def test_timm_export_at_another_size():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = dm.vit_small(patch_size=16, depth=2).eval()
    tm = to_timm(ours, img_size=48).eval()  # pos_embed resampled as interpolate_pos_encoding does
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(tm(x), ours(x), rtol=1e-5, atol=1e-5)


def test_from_timm_refuses_timm_only_layers():
    # registers convert now (tests/test_backbones_timm.py); layers with no counterpart are refused
    with pytest.raises(ValueError, match="fc_norm"):
        from_timm_state_dict({"fc_norm.weight": torch.ones(384), "norm.weight": torch.ones(384),
                              "pos_embed": torch.zeros(1, 5, 384), "reg_token": torch.zeros(1, 4, 384)})
    out = from_timm_state_dict({"head.weight": torch.zeros(10, 384), "norm.weight": torch.ones(384)})
    assert list(out) == ["norm.weight"]
