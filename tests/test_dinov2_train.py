"""`dino-fast train --method dinov2` end to end on CPU: a 2-step run (both
centrings, Gram anchoring on) with every loss term and both heads' entropies
in the log and finite, the same over 2 gloo processes with FSDP2, the DINO
default untouched, and the demo learning (k-NN before -> after)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dino_fast.train.presets import resolve
from tests._dist import run_distributed
from tests.test_train import _Interrupt, _one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

TINY = dict(method="dinov2", patch_size=4, depth=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
            global_size=16, local_size=8, local_crops_number=2, batch_size_per_gpu=8, max_images=16, epochs=1,
            warmup_epochs=0, lr=0.005, log_interval=1, num_workers=0, knn_eval=False, drop_path_rate=0.1,
            drop_path_uniform=True, saveckp_freq=0, momentum_teacher=0.9, device="cpu", layerwise_decay=0.9,
            patch_embed_lr_mult=0.2, freeze_last_layer=0)
TERMS = ("dino_local", "dino_global", "ibot", "koleo", "gram")
ENTROPIES = ("teacher_entropy", "student_entropy", "ibot_teacher_entropy", "ibot_student_entropy")




def _steps(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "step"]


@pytest.mark.parametrize("centering,separate", [("softmax", False), ("sinkhorn_knopp", True)])
def test_two_steps_log_every_term_finite(tmp_path, centering, separate):
    from dino_fast.train.loop import train
    cfg = resolve(None, {**TINY, "output_dir": str(tmp_path / "run"), "centering": centering,
                         "ibot_separate_head": separate, "ibot_out_dim": 48, "ibot_head_hidden_dim": 32,
                         "ibot_head_bottleneck_dim": 16, "gram_loss_weight": 0.5, "gram_teacher_size": 24,
                         "gram_update_frequency": 1})
    train(cfg)
    steps = _steps(cfg.output_dir)
    assert [r["it"] for r in steps] == [1, 2]
    for r in steps:
        for k in ("loss",) + TERMS + ENTROPIES:
            assert k in r and r[k] == r[k] and abs(r[k]) < 1e4, (k, r.get(k))
        assert r["gram"] > 0                                  # the Gram teacher ran (refreshed every step)
        assert r["ibot"] > 0 and r["dino_local"] > 0 and r["dino_global"] > 0
    ck = torch.load(os.path.join(cfg.output_dir, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert set(ck["dino_loss"]) == {"dino_loss.center", "ibot_patch_loss.center"}
    assert "backbone.mask_token" in ck["student"] and ("ibot_head.last_layer.weight_v" in ck["student"]) == separate
    if centering == "softmax":                                # the EMA centres moved
        assert ck["dino_loss"]["ibot_patch_loss.center"].abs().sum() > 0


def test_dino_method_stays_the_default():
    cfg = resolve(None, {})
    assert cfg.method == "dino" and cfg.preset == "demo"
    assert resolve(None, {"method": "dinov2"}).preset == "dinov2_demo"


def _fsdp_worker(rank, world, out_dir):
    from dino_fast.train.loop import train
    cfg = resolve(None, {**TINY, "output_dir": out_dir, "fsdp": "on", "ibot_separate_head": True,
                         "ibot_out_dim": 48, "ibot_head_hidden_dim": 32, "ibot_head_bottleneck_dim": 16,
                         "gram_loss_weight": 0.5, "gram_update_frequency": 1, "max_images": 32})
    torch.set_num_threads(1)
    train(cfg)


def test_fsdp_two_gloo_processes(tmp_path):
    out = str(tmp_path / "fsdp")
    run_distributed(_fsdp_worker, out, world_size=2)
    steps = _steps(out)
    assert [r["it"] for r in steps] == [1, 2]
    for r in steps:
        for k in ("loss",) + TERMS + ENTROPIES:
            assert k in r and r[k] == r[k], (k, r.get(k))
    assert os.path.exists(os.path.join(out, "checkpoint"))     # the sharded checkpoint


def test_resume_is_bit_for_bit(tmp_path, monkeypatch):
    """Killed after epoch 1's checkpoint and resumed == uninterrupted: the step losses (masks from
    (seed, iteration, rank), lazy centres saved with their pending update) and the final weights."""
    from dino_fast.train import checkpoint
    from dino_fast.train.loop import train
    kw = {**TINY, "epochs": 2, "saveckp_freq": 1, "log_interval": 2, "drop_path_rate": 0.0}
    train(resolve(None, {**kw, "output_dir": str(tmp_path / "full")}))
    save = checkpoint.save

    def save_then_die(*a, **k):
        save(*a, **k)
        raise _Interrupt
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Interrupt):
        train(resolve(None, {**kw, "output_dir": str(tmp_path / "cut")}))
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = train(resolve(None, {**kw, "output_dir": str(tmp_path / "cut")}))
    assert resumed["start_epoch"] == 1
    assert [r["loss"] for r in _steps(tmp_path / "cut")] == [r["loss"] for r in _steps(tmp_path / "full")]
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    for part in ("student", "teacher", "dino_loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_ibot_head_collapse_monitor_reads_the_ibot_entropy():
    """The second monitor sees the iBOT head's entropy under the DINO names and says which head."""
    import math

    from dino_fast.dinov2.build import ibot_monitor, ibot_record
    cfg = resolve(None, {**TINY, "ibot_separate_head": True, "ibot_out_dim": 48, "collapse_patience": 2})
    mon = ibot_monitor(cfg)
    assert mon.out_dim == 48
    rec = {"epoch": 0, "lr": 1e-3, "teacher_entropy": 1.0, "student_entropy": 2.0,
           "ibot_teacher_entropy": math.log(48), "ibot_student_entropy": math.log(48), "ibot_teacher_max_prob": 0.02}
    view = ibot_record(rec)
    assert view["teacher_entropy"] == math.log(48) and view["teacher_max_prob"] == 0.02 and view["lr"] == 1e-3
    assert mon.update(view, 0) is None
    alarm = mon.update(view, 0)
    assert alarm.startswith("iBOT head") and "UNIFORM" in alarm


def test_init_from_a_backbone_without_mask_token(tmp_path):
    """--method dinov2 --init_from a released-style backbone (timm, no mask token): the backbone
    weights load into student and teacher, the mask token starts at 0 (DINOv2's init)."""
    timm = pytest.importorskip("timm")
    from dino_fast.dinov2.network import build_dinov2_pair
    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    path = tmp_path / "vits.pth"
    torch.save(t.state_dict(), path)
    cfg = resolve(None, {**TINY, "init_from": str(path), "global_size": 32, "local_size": 16, "patch_size": 16})
    student, teacher = build_dinov2_pair(cfg)
    assert torch.equal(student.backbone.mask_token, torch.zeros(1, 384))
    torch.testing.assert_close(student.backbone.blocks[1].attn.qkv.weight, t.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(teacher.backbone.blocks[0].mlp.fc2.weight, t.blocks[0].mlp.fc2.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_has_no_host_sync():
    """A whole dinov2 step on CUDA (bf16 autocast, fused losses, Gram on) under
    set_sync_debug_mode('error'), after a first step that compiles the kernels."""
    from dino_fast.train.build import prepare
    from dino_fast.train.methods import method_parts
    from dino_fast.train.optim import build_optimizer
    from dino_fast.train.step import StepState
    cfg = resolve(None, {**TINY, "device": "cuda", "ibot_separate_head": True, "ibot_out_dim": 48,
                         "ibot_head_hidden_dim": 32, "ibot_head_bottleneck_dim": 16, "gram_loss_weight": 0.5,
                         "gram_update_frequency": 1000, "centering": "sinkhorn_knopp"})
    dev = torch.device("cuda")
    from dino_fast.train import loop
    parts = method_parts(cfg, loop)
    s, t = parts.build_pair(cfg)
    s, t, autocast, scaler = prepare(cfg, s, t, dev, 1, False)
    st = StepState(cfg, s, t, parts.build_loss(cfg, dev), build_optimizer("adamw", parts.params_groups(cfg, s)),
                   parts.build_schedules(cfg, 10, 1), autocast, scaler, False)
    B = cfg.batch_size_per_gpu
    crops = [torch.randn(B, 3, 16, 16, device=dev) for _ in range(2)] + \
        [torch.randn(B, 3, 8, 8, device=dev) for _ in range(2)]
    parts.train_step(st, crops, 0, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = parts.train_step(st, crops, 1, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for k, v in st.dino_loss.last_stats.items() if k in TERMS)
