"""DINOv2's parameter groups and schedules (dino_fast.dinov2.param_groups):
layer-wise lr decay, patch-embedding multiplier and weight-decay exemptions
against the formula lr_mult = d^(L + 1 - layer_id), the per-group lr / wd
the step sets, the last layer's lr held at 0 while frozen, and the
teacher-temperature and Gram-weight schedules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_fast.dinov2.network import build_dinov2_network
from dino_fast.dinov2.param_groups import build_schedules, get_params_groups, linear_warmup_cosine_decay
from dino_fast.train.presets import resolve

SMALL = dict(method="dinov2", patch_size=4, depth=3, out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8,
             global_size=16, local_size=8, local_crops_number=2, batch_size_per_gpu=4, device="cpu",
             layerscale_init=1e-5, num_register_tokens=2, ibot_separate_head=True, ibot_out_dim=24,
             ibot_head_hidden_dim=16, ibot_head_bottleneck_dim=8, norm_last_layer=False)


def expected(name: str, L: int, d: float, pe: float) -> tuple[float, float, bool]:
    """The formula, written out per parameter name."""
    if name.startswith("backbone.blocks."):
        lid = int(name.split(".")[2]) + 1
    elif name.split(".")[1] in ("pos_embed", "patch_embed", "cls_token", "register_tokens", "mask_token"):
        lid = 0
    else:
        lid = L + 1                                  # final norm, both heads
    lr = d ** (L + 1 - lid) * (pe if ".patch_embed." in name else 1.0)
    wd = 0.0 if (name.endswith(".bias") or "norm" in name or ".ls1." in name or ".ls2." in name) else 1.0
    return lr, wd, "last_layer" in name


@pytest.mark.parametrize("d,pe", [(0.9, 0.2), (1.0, 1.0), (0.65, 0.5)])
def test_layerwise_decay_and_multipliers_match_the_formula(d, pe):
    cfg = resolve(None, {**SMALL, "layerwise_decay": d, "patch_embed_lr_mult": pe})
    net = build_dinov2_network(cfg, student=True)
    groups = get_params_groups(net, d, pe)
    of = {id(p): g for g in groups for p in g["params"]}
    L = 3
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(of) == len(names)
    for n, p in net.named_parameters():
        lr, wd, last = expected(n, L, d, pe)
        g = of[id(p)]
        assert math.isclose(g["lr_multiplier"], lr, rel_tol=1e-12), (n, g["lr_multiplier"], lr)
        assert g["wd_multiplier"] == wd, n
        assert g["is_last_layer"] == last, n
    # spot values at d = 0.9, pe = 0.2 (L = 3): block 0 0.9^3, patch embedding 0.9^4 * 0.2, head 1
    if (d, pe) == (0.9, 0.2):
        assert math.isclose(of[id(net.backbone.blocks[0].attn.qkv.weight)]["lr_multiplier"], 0.729)
        assert math.isclose(of[id(net.backbone.patch_embed.proj.weight)]["lr_multiplier"], 0.9 ** 4 * 0.2)
        assert of[id(net.ibot_head.mlp[0].weight)]["lr_multiplier"] == 1.0
    # groups are fused: one per distinct (lr, wd, last) triple
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_schedule_application_per_group_and_last_layer_freeze():
    cfg = resolve(None, {**SMALL, "layerwise_decay": 0.8, "patch_embed_lr_mult": 0.5, "epochs": 4,
                         "warmup_epochs": 1, "freeze_last_layer": 1, "lr": 0.004, "lr_scaling": "sqrt_wrt_1024",
                         "batch_size_per_gpu": 64, "min_lr": 1e-6})
    net = build_dinov2_network(cfg, student=True)
    opt = torch.optim.AdamW(get_params_groups(net, 0.8, 0.5))
    sched = build_schedules(cfg, niter_per_ep=5, world_size=16)      # total batch 1024: lr = 0.004
    assert math.isclose(sched.lr[5], 0.004, rel_tol=1e-12)            # end of warm-up
    for it in (2, 4, 5, 13):
        sched.set_optimizer(opt, it)
        for g in opt.param_groups:
            base = 0.0 if (g["is_last_layer"] and it < 5) else sched.lr[it]
            assert g["lr"] == pytest.approx(base * g["lr_multiplier"], rel=1e-12)
            assert g["weight_decay"] == pytest.approx(sched.wd[it] * g["wd_multiplier"], rel=1e-12)
    # DINOv2: the teacher temperature warms up per iteration, then stays
    cfg2 = resolve(None, {**SMALL, "epochs": 4, "warmup_teacher_temp_epochs": 2, "warmup_teacher_temp": 0.04,
                          "teacher_temp": 0.07})
    s2 = build_schedules(cfg2, niter_per_ep=5, world_size=1)
    np.testing.assert_allclose(s2.teacher_temp[:10], np.linspace(0.04, 0.07, 10))
    np.testing.assert_allclose(s2.teacher_temp[10:], 0.07)


def test_lr_scaling_rules():
    from dino_fast.dinov2.train_config import scaled_lr
    cfg = resolve(None, {**SMALL, "lr": 0.004, "lr_scaling": "sqrt_wrt_1024"})
    assert math.isclose(scaled_lr(cfg, 2048), 0.004 * math.sqrt(2))
    cfg = resolve(None, {**SMALL, "lr": 0.0005, "lr_scaling": "linear_wrt_256"})
    assert math.isclose(scaled_lr(cfg, 1024), 0.002)


def test_gram_weight_schedule_is_dinov3s():
    # DINOv3 7B: start 0, peak 0, end 2.0, warm-up 1000 epochs, cosine 1 epoch (here 3 + 2 of 8, 4 it/epoch)
    w = linear_warmup_cosine_decay(0.0, 0.0, 2.0, 12, 32, 8)
    assert len(w) == 32 and (w[:12] == 0).all() and (w[20:] == 2.0).all()
    ramp = 2.0 * (1 - (np.cos(np.linspace(0, np.pi, 8)) + 1) / 2)   # 0 -> 2 on a half cosine
    np.testing.assert_allclose(w[12:20], ramp, atol=1e-12)
    cfg = resolve(None, {**SMALL, "epochs": 8, "gram_loss_weight": 2.0, "gram_weight_warmup_epochs": 3,
                         "gram_weight_ramp_epochs": 2})
    np.testing.assert_allclose(build_schedules(cfg, 4, 1).gram_weight, w)
