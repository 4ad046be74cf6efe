"""Convnet backbones (`--arch resnet50`, torchvision or timm names): one demo training step of a
ResNet-50, k-NN and the linear probe on its checkpoint, export layouts loading into torchvision /
timm models, the reference's released-ResNet format, SyncBatchNorm, timm heads kept."""
import re

import pytest
import torch

import dino_fast
from dino_fast.model.convnet import build_convnet, detect_resnet, fsdp_units
from tests.test_knn import tiny_dataset  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """One optimizer step of DINO with a ResNet-50 on 28 px demo crops."""
    import dino_fast.train.loop as loop
    from dino_fast.train.presets import resolve
    out = tmp_path_factory.mktemp("resnet")
    cfg = resolve("demo", dict(arch="resnet50", epochs=1, max_images=8, batch_size_per_gpu=8, out_dim=256,
                               output_dir=str(out), knn_eval=False, num_workers=0, device="cpu", pipeline="torch",
                               log_interval=1, freeze_last_layer=0, warmup_epochs=0, lr=0.05))
    seen, build = {}, loop.build_pair

    def build_and_keep(c):
        student, teacher = build(c)
        seen["before"] = {k: v.clone() for k, v in student.state_dict().items()}
        return student, teacher

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "build_pair", build_and_keep)
    try:
        summary = loop.train(cfg)
    finally:
        mp.undo()
    return out, seen["before"], summary


def test_resnet50_trains_one_demo_step(resnet_run):
    out, before, summary = resnet_run
    assert len(summary["step_losses"]) == 1 and torch.isfinite(torch.tensor(summary["step_losses"])).all()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    student, teacher = ckpt["student"], ckpt["teacher"]
    assert "backbone.layer4.2.conv3.weight" in student and not any(k.startswith("backbone.fc.") for k in student)
    k = "backbone.layer1.0.conv1.weight"
    assert not torch.equal(before[k], student[k])                       # the optimizer step
    assert not torch.equal(before[k], teacher[k]) and not torch.equal(student[k], teacher[k])  # the EMA
    # batch norm statistics moved in the step (BN in train mode, as the reference)
    assert not torch.equal(before["backbone.bn1.running_mean"], student["backbone.bn1.running_mean"])


def test_resnet50_knn_and_linear_run(resnet_run, tiny_dataset, tmp_path, capsys):  # noqa: F811
    import torchvision
    from dino_fast.cli import main
    from dino_fast.eval.data import eval_transform, train_val_folders
    out, _, _ = resnet_run
    ckpt = str(out / "checkpoint.pth")
    res = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", ckpt, "--data_path", str(tiny_dataset), "--nb_knn", "1", "5",
                 "--resize", "32", "--crop", "32", "--batch_size", "16", "--num_workers", "0", "--device", "cpu",
                 "--cache_dir", str(tmp_path / "cache"), "--output", str(res)]) == 0
    import json
    results = json.loads(res.read_text())["results"]
    assert 0.0 <= results["5"]["top1"] <= 100.0
    # the features are torchvision's ResNet-50 (fc removed) with the teacher's weights
    tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Identity()
    sd = {k[len("backbone."):]: v for k, v in torch.load(ckpt, weights_only=False)["teacher"].items()
          if k.startswith("backbone.")}
    tv.load_state_dict(sd, strict=True)
    tv.eval()
    tr, _ = train_val_folders(str(tiny_dataset), eval_transform(32, 32))
    x = torch.stack([tr[i][0] for i in range(4)])
    model = dino_fast.load(ckpt)
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5)
    from dino_fast.eval.linear import linear_features
    with torch.no_grad():
        assert torch.equal(linear_features(model, x, 4, True), model(x))
    capsys.readouterr()
    assert main(["linear", "--checkpoint", ckpt, "--data_path", str(tiny_dataset), "--epochs", "2", "--resize", "32",
                 "--crop", "32", "--num_workers", "0", "--device", "cpu", "--cache_dir", "none",
                 "--output_dir", str(tmp_path / "lin")]) == 0
    text = capsys.readouterr().out
    assert "pooled convnet features" in text and re.search(r"val top-1 \d+\.\d+", text)


def test_resnet_export_layouts(resnet_run, tmp_path):
    import timm
    import torchvision
    from dino_fast.eval.export import export_checkpoint
    out, _, _ = resnet_run
    ckpt = str(out / "checkpoint.pth")
    x = torch.randn(2, 3, 40, 40)
    want = dino_fast.load(ckpt)(x).detach()
    export_checkpoint(ckpt, str(tmp_path / "ref.pth"), "reference")
    tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "ref.pth"), strict=True)   # the reference's ResNet format
    export_checkpoint(ckpt, str(tmp_path / "timm.pth"), "timm")
    tm = timm.create_model("resnet50", pretrained=False, num_classes=0)
    tm.load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), want, atol=1e-5) and torch.allclose(tm.eval()(x), want, atol=1e-5)
    # a bare ResNet state dict (the reference's released dino_resnet50_pretrain.pth, or torchvision's with its
    # fc) is recognised without --arch
    full = torchvision.models.resnet50().state_dict()
    assert detect_resnet(full) == "resnet50"
    torch.save(full, tmp_path / "tv.pth")
    m, cfg = dino_fast.eval.load.load_with_config(str(tmp_path / "tv.pth"))
    assert cfg.kind == "convnet" and cfg.arch == "resnet50" and cfg.embed_dim == 2048
    for fmt in ("dinov2", "dinov3"):
        with pytest.raises(ValueError, match="convnet"):
            export_checkpoint(ckpt, str(tmp_path / "bad.pth"), fmt)


def test_convnets_by_name_keep_their_final_norm(tmp_path):
    import timm
    from dino_fast.model import DINOHead, MultiCropWrapper
    m = build_convnet("timm:convnext_atto")
    w = MultiCropWrapper(m, DINOHead(m.embed_dim, 64, hidden_dim=32, bottleneck_dim=16))
    assert not isinstance(w.backbone.head, torch.nn.Identity)            # timm's head holds the norm
    torch.manual_seed(0)
    ref = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    m.load_state_dict(ref.state_dict(), strict=True)
    crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        feats = torch.cat([m.eval()(torch.cat(crops[:2])), m(crops[2])])
        assert torch.allclose(feats, torch.cat([ref(torch.cat(crops[:2])), ref(crops[2])]), atol=1e-5)
        assert torch.allclose(w.eval()(crops), w.head(feats), atol=1e-5)  # the per-resolution loop
    tv = build_convnet("convnext_tiny")                                   # torchvision: LayerNorm2d kept
    assert isinstance(tv.classifier[2], torch.nn.Identity) and not isinstance(tv.classifier[0], torch.nn.Identity)
    assert tv.embed_dim == 768
    torch.save(tv.state_dict(), tmp_path / "cx.pth")
    with pytest.raises(ValueError, match="--arch"):
        dino_fast.load(str(tmp_path / "cx.pth"))
    assert dino_fast.eval.load.load_with_config(str(tmp_path / "cx.pth"), arch="convnext_tiny")[1].arch == \
        "convnext_tiny"
    with pytest.raises(ValueError, match="neither a dino-fast ViT"):
        build_convnet("no_such_net")


def test_sync_batchnorm_and_fsdp_units():
    from dino_fast.train.build import sync_batchnorm
    m = build_convnet("resnet18")
    assert sync_batchnorm(m, 1, torch.device("cuda")) is m
    assert sync_batchnorm(m, 2, torch.device("cpu")) is m                 # SyncBatchNorm needs CUDA
    s = sync_batchnorm(build_convnet("resnet18"), 2, torch.device("cuda"))  # module swap only, no device use
    kinds = {type(x) for x in s.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert [n for n, c in m.named_children() if any(c is u for u in fsdp_units(m))] == \
        ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


def test_train_config_accepts_convnet_names():
    from dino_fast.train.config import ConfigError
    from dino_fast.train.presets import resolve
    assert resolve(None, dict(arch="resnet50", data_path="demo")).arch == "resnet50"
    assert resolve(None, dict(arch="timm:convnext_atto", data_path="demo")).arch == "timm:convnext_atto"
    with pytest.raises(ConfigError, match="neither a dino-fast ViT"):
        resolve(None, dict(arch="resnet_nope", data_path="demo"))
