"""Continued pretraining: `dino-fast train --init_from PATH` starts student and teacher from an
exported backbone; the first step's teacher features equal the loaded backbone's (also when the
position embedding is resized to the training crops); heads load from a training checkpoint."""
import pytest
import torch

import dino_fast
import dino_fast.train.loop as loop
from dino_fast.eval.export import export_checkpoint
from dino_fast.train.presets import resolve

timm = pytest.importorskip("timm")


def _timm_file(tmp_path, name, **kw):
    torch.manual_seed(0)
    t = timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw).eval()
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "gamma" in n:
                p.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.pth"
    torch.save(t.state_dict(), path)
    return str(path)


def _run(tmp_path, init_from, monkeypatch, **over):
    """Train one short epoch from init_from; returns (summary, the teacher backbone's first
    (input crops, output), the student and teacher as built)."""
    seen = {}
    build = loop.build_pair

    def build_and_watch(cfg):
        student, teacher = build(cfg)
        seen["student"] = {k: v.clone() for k, v in student.state_dict().items()}
        seen["teacher_module"] = teacher

        def hook(mod, args, out):
            if "first" not in seen:
                seen["first"] = ([c.clone() for c in args[0]], out.detach().clone())
        teacher.backbone.register_forward_hook(hook)
        return student, teacher

    monkeypatch.setattr(loop, "build_pair", build_and_watch)
    cfg = resolve("demo", {**dict(init_from=init_from, epochs=1, max_images=16, batch_size_per_gpu=8, out_dim=256,
                                  output_dir=str(tmp_path / "run"), knn_eval=False, num_workers=0, device="cpu",
                                  pipeline="torch", log_interval=1), **over})
    return loop.train(cfg), seen


@pytest.mark.parametrize("name,kw,fmt", [
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56), "reference"),   # DINOv2 layout, pos_embed 56 -> 28 px
    ("vit_small_patch14_dinov2", dict(img_size=28), "timm"),             # no resize
    ("vit_small_patch16_dinov3_qkvb", dict(), "dinov3"),                 # RoPE: nothing to resize
])
def test_first_step_teacher_features_equal_the_loaded_backbone(name, kw, fmt, tmp_path, monkeypatch):
    src = _timm_file(tmp_path, name, **kw)
    exported = str(tmp_path / f"export_{fmt}.pth")
    export_checkpoint(src, exported, fmt)
    over = dict(global_size=32, local_size=16) if "patch16" in name else dict(global_size=28, local_size=14)
    summary, seen = _run(tmp_path, exported, monkeypatch, **over)
    assert summary["epochs"] and torch.isfinite(torch.tensor(summary["step_losses"])).all()
    crops, out = seen["first"]
    assert len(crops) == 2 and crops[0].shape[-1] == over["global_size"]
    loaded = dino_fast.load(exported, attention="math")
    with torch.no_grad():
        want = loaded(crops)
    assert out.shape == want.shape
    assert ((out - want).abs().max() / want.abs().max()) < 1e-5
    backbone = seen["teacher_module"].backbone
    if backbone.pos_embed is not None:  # stored at the training size
        assert backbone.patch_embed.img_size == over["global_size"]
        assert backbone.pos_embed.shape[1] == 1 + (over["global_size"] // 14) ** 2
    # the run's checkpoint records the loaded architecture, not the config's default arch
    _, cfg = dino_fast.eval.load.load_with_config(str(tmp_path / "run" / "checkpoint.pth"))
    assert cfg.num_register_tokens == 4 * ("reg4" in name or "dinov3" in name) and cfg.depth == 2
    assert cfg.pos_embed == ("rope" if "dinov3" in name else "learned")


def test_heads_load_from_a_training_checkpoint(tmp_path, monkeypatch, caplog):
    src = _timm_file(tmp_path, "vit_small_patch14_dinov2", img_size=28)
    _run(tmp_path / "a", src, monkeypatch, global_size=28, local_size=14)
    ckpt = tmp_path / "a" / "run" / "checkpoint.pth"
    file_teacher = torch.load(ckpt, weights_only=False)["teacher"]
    _, seen = _run(tmp_path / "b", str(ckpt), monkeypatch, global_size=28, local_size=14)
    for k, v in file_teacher.items():  # backbone and head: the file's teacher
        assert torch.equal(seen["student"][k], v), k
    # another head shape: the head starts fresh, the backbone still loads
    with caplog.at_level("WARNING"):
        _, seen = _run(tmp_path / "c", str(ckpt), monkeypatch, global_size=28, local_size=14, out_dim=128)
    assert "head starts fresh" in caplog.text
    assert seen["student"]["head.last_layer.weight_v"].shape == (128, 128)
    assert torch.equal(seen["student"]["backbone.norm.weight"], file_teacher["backbone.norm.weight"])


def test_init_from_clear_errors(tmp_path):
    from dino_fast.train.config import ConfigError
    with pytest.raises(ConfigError, match="--init_from .*does not exist"):
        resolve("demo", dict(init_from=str(tmp_path / "nope.pth")))
