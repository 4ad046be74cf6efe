"""Export round trips: every format written by `dino-fast export` loads back
with `dino_fast.load` to the same features; a fake reference main_dino.py
checkpoint (module./backbone./head. prefixes, Namespace args) loads as
teacher and student; the reference format loads strictly into a freshly
built ViT (what the reference hubconf does) and the timm format into timm's
own VisionTransformer; clear errors."""
from __future__ import annotations

import argparse
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn

import dino_fast
from dino_fast.eval.load import CheckpointError, load_with_config
from dino_fast.model import VisionTransformer, vit_tiny


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def fake_reference_checkpoint(tmp_path_factory):
    """main_dino.py layout: the student DDP-wrapped (module.backbone./module.head.),
    the teacher not (backbone./head.), args an argparse.Namespace."""
    torch.manual_seed(0)
    teacher = _perturbed(vit_tiny(patch_size=8, depth=2), 1)
    student = _perturbed(vit_tiny(patch_size=8, depth=2), 2)
    head = {"mlp.0.weight": torch.randn(32, 192), "last_layer.weight_g": torch.ones(64, 1),
            "last_layer.weight_v": torch.randn(64, 16)}
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    **{f"head.{k}": v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 5, "dino_loss": {"center": torch.zeros(1, 64)},
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64, lr=0.0005),
    }
    path = tmp_path_factory.mktemp("ref") / "checkpoint.pth"
    torch.save(ckpt, path)
    return path, teacher, student


X = torch.randn(2, 3, 40, 56)  # non-square, not 224: positional-embedding interpolation in use


@torch.no_grad()
def _feats(m):
    return m.eval()(X)


def test_load_full_reference_checkpoint(fake_reference_checkpoint):
    path, teacher, student = fake_reference_checkpoint
    t = dino_fast.load(str(path))                       # the public entry point, teacher by default
    s = dino_fast.load(str(path), checkpoint_key="student")
    assert not t.training
    assert torch.equal(_feats(t), _feats(teacher))
    assert torch.equal(_feats(s), _feats(student))
    _, cfg = load_with_config(str(path))
    assert (cfg.arch, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == ("vit_tiny", 8, 192, 2, 3)


@pytest.mark.parametrize("fmt", ["reference", "timm", "safetensors"])
@pytest.mark.parametrize("key", ["teacher", "student"])
def test_export_round_trip(fmt, key, fake_reference_checkpoint, tmp_path, capsys):
    from dino_fast.cli import main
    path, teacher, student = fake_reference_checkpoint
    out = tmp_path / f"backbone.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    assert main(["export", "--checkpoint", str(path), "--checkpoint_key", key, "--format", fmt,
                 "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    want = _feats(teacher if key == "teacher" else student)
    assert torch.equal(_feats(dino_fast.load(str(out))), want)         # features equal after reload
    assert not list(tmp_path.glob(".*tmp*"))                            # atomic write, no temp left
    if fmt == "reference":   # what the reference hubconf does: build, load_state_dict(strict=True)
        fresh = vit_tiny(patch_size=8, depth=2)
        fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
        assert torch.equal(_feats(fresh), want)
    if fmt == "timm":        # timm's own ViT at the exported (square) size
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        t = TimmViT(img_size=224, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0).eval()
        t.load_state_dict(torch.load(out, weights_only=True), strict=True)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(t(x), _feats_at(teacher if key == "teacher" else student, x),
                                       rtol=1e-4, atol=1e-5)
    if fmt == "safetensors":
        from safetensors import safe_open
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "dino_fast.backbone.v1" and '"num_heads": 3' in meta["config"]


@torch.no_grad()
def _feats_at(m, x):
    return m.eval()(x)


def test_non_standard_model_round_trips_via_safetensors(tmp_path):
    """num_heads cannot be read from shapes: safetensors carries the config;
    a plain state dict needs num_heads= (and says so)."""
    from dino_fast.eval.export import export_checkpoint
    m = _perturbed(VisionTransformer(img_size=[32], patch_size=4, embed_dim=96, depth=3, num_heads=4,
                                     qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)), 3)
    torch.save(m.state_dict(), tmp_path / "plain.pth")
    export_checkpoint(str(tmp_path / "plain.pth"), str(tmp_path / "m.safetensors"), "safetensors", num_heads=4)
    assert torch.equal(_feats(dino_fast.load(str(tmp_path / "m.safetensors"))), _feats(m))
    assert torch.equal(_feats(dino_fast.load(str(tmp_path / "plain.pth"), num_heads=4)), _feats(m))
    _, cfg = load_with_config(str(tmp_path / "plain.pth"))           # guessed 96 // 64 = 1 head: differs
    assert cfg.num_heads == 1 and cfg.img_size == 32 and cfg.depth == 3 and cfg.patch_size == 4


def test_load_torch_distributed_checkpoint_folder(fake_reference_checkpoint, tmp_path):
    import torch.distributed.checkpoint as dcp
    _, teacher, _ = fake_reference_checkpoint
    state = {"teacher": {f"backbone.{k}": v.clone() for k, v in teacher.state_dict().items()}, "epoch": 3}
    dcp.save(state, checkpoint_id=str(tmp_path / "checkpoint"))
    assert torch.equal(_feats(dino_fast.load(str(tmp_path / "checkpoint"))), _feats(teacher))


def test_clear_errors(fake_reference_checkpoint, tmp_path, monkeypatch, capsys):
    from dino_fast.cli import main
    path, teacher, _ = fake_reference_checkpoint
    with pytest.raises(CheckpointError, match="nope.pth: no such checkpoint file"):
        dino_fast.load(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        dino_fast.load(str(tmp_path / "junk.pth"))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="no 'student' weights.*--checkpoint_key teacher"):
        dino_fast.load(str(tmp_path / "t.pth"), checkpoint_key="student")
    with pytest.raises(CheckpointError, match="patch size 8, not --patch_size 16"):
        dino_fast.load(str(path), patch_size=16)
    sd = {f"backbone.{k}": v for k, v in teacher.state_dict().items() if "blocks.1.mlp" not in k}
    sd["backbone.blocks.1.mlp.fc1.weight"] = torch.zeros(10, 192)  # truncated / mismatched
    torch.save({"teacher": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: does not match.*missing"):
        dino_fast.load(str(tmp_path / "bad.pth"))
    torch.save({"model_ema": 1, "step": 2}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a ViT checkpoint"):
        dino_fast.load(str(tmp_path / "other.pth"))
    # CLI: one-line errors, exit 2
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "o.pth")]) == 2
    assert "nope.pth: no such checkpoint file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the optional extra missing
    assert main(["export", "--checkpoint", str(path), "--format", "safetensors",
                 "--output", str(tmp_path / "o.safetensors")]) == 2
    assert "pip install 'dino-fast[export]'" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_load_training_loop_checkpoint(tmp_path):
    """A real dino-fast training checkpoint (2 steps of the training loop on
    the demo data) loads as teacher and student, equal to the model helper's
    own reference loader, and round-trips through safetensors."""
    from dino_fast.eval.export import export_checkpoint
    from dino_fast.model.checkpoint import load_reference_state_dict
    from dino_fast.train.loop import train
    from dino_fast.train.presets import resolve
    cfg = resolve("demo", {"epochs": 1, "max_images": 64, "batch_size_per_gpu": 32, "knn_eval": False, "depth": 2,
                           "patch_size": 4,
                           "local_crops_number": 2, "out_dim": 256, "precision": "fp32",
                           "output_dir": str(tmp_path / "run")})
    train(cfg)
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    x = torch.randn(2, 3, 28, 28)
    for key in ("teacher", "student"):
        ref = vit_tiny(patch_size=4, depth=2)
        ref.load_state_dict(load_reference_state_dict(ckpt, key=key), strict=True)
        got = dino_fast.load(ckpt, checkpoint_key=key)
        with torch.no_grad():
            assert torch.equal(got(x), ref.eval()(x))
    export_checkpoint(ckpt, str(tmp_path / "t.safetensors"), "safetensors")
    with torch.no_grad():
        assert torch.equal(dino_fast.load(str(tmp_path / "t.safetensors"))(x), dino_fast.load(ckpt)(x))
