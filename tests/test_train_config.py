"""Config, presets, CLI flags, validation errors, schedules and optimizer pieces
(against formulas written here independently of the code under test)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import fields

import numpy as np
import pytest
import torch
from torch import nn

from dino_fast.commands.train import add_arguments, overrides_from_args
from dino_fast.flags import Parser
from dino_fast.train.config import ConfigError, TrainConfig, field_docs, save
from dino_fast.train.optim import (build_schedules, cancel_gradients_last_layer, clip_gradients,
                                   get_params_groups, LARS)
from dino_fast.train.presets import PRESETS, resolve

# ---- config -----------------------------------------------------------------------------------
REFERENCE_DEFAULTS = dict(  # main_dino.py get_args_parser()
    arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
    use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
    weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
    freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw", drop_path_rate=0.1,
    global_crops_scale=(0.4, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.4), saveckp_freq=20,
    seed=0, num_workers=10, output_dir=".")


def test_reference_defaults_and_field_docs():
    cfg = TrainConfig()
    for k, v in REFERENCE_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    docs = field_docs()
    missing = [f.name for f in fields(TrainConfig) if not docs.get(f.name)]
    assert not missing, f"fields without a docstring: {missing}"


def parse(argv):
    p = Parser()
    add_arguments(p)
    a = p.parse_args(argv)
    return resolve(a.preset, overrides_from_args(a), check=False)


def test_flags_override_preset_and_no_args_is_demo():
    assert parse([]).preset == "demo" and parse([]).arch == "vit_tiny"
    cfg = parse(["--preset", "vit_b8_in1k", "--lr", "0.001", "--norm_last_layer", "false",
                 "--global_crops_scale", "0.3", "1.0", "--data_path", "/x"])
    assert (cfg.arch, cfg.patch_size, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs) == ("vit_base", 8, 0.07, 50)
    assert cfg.lr == 0.001 and cfg.norm_last_layer is False and cfg.global_crops_scale == (0.3, 1.0)
    assert parse(["--data_path", "/x"]).preset == "" and parse(["--data_path", "/x"]).arch == "vit_small"
    s16 = parse(["--preset", "vit_s16_in1k"])  # README: --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
    assert (s16.teacher_temp, s16.warmup_teacher_temp_epochs, s16.norm_last_layer, s16.epochs) == (0.07, 30, False, 300)


def test_validation_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'vit_h14'; choices: demo, dinov2_demo, dinov2_vitl14_in1k, "
                                         r"dinov2_vitl16_in1k, dinov3_vitl16_in1k, small, vit_b16_in1k, vit_b8_in1k, vit_s16_in1k"):
        resolve("vit_h14")
    with pytest.raises(ConfigError, match=r"--global_crops_scale 0.5 0.2.*0 < min <= max <= 1"):
        resolve("demo", {"global_crops_scale": (0.5, 0.2)})
    with pytest.raises(ConfigError, match=r"--local_crops_scale 0.0 0.4"):
        resolve("demo", {"local_crops_scale": (0.0, 0.4)})
    with pytest.raises(ConfigError, match=r"--data_path '/no/such/images' does not exist"):
        resolve(None, {"data_path": "/no/such/images"})
    with pytest.raises(ConfigError, match=r"not divisible by --grad_accum_steps 3"):
        resolve("demo", {"grad_accum_steps": 3})
    with pytest.raises(ConfigError, match=r"--optimizer 'adam' is not one of: adamw, sgd, lars"):
        resolve("demo", {"optimizer": "adam"})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) --learning_rate"):
        resolve("demo", {"learning_rate": 1.0})
    assert resolve("demo", {"use_fp16": True}).precision == "fp16"   # the reference flag still works
    path = save(resolve("demo", {"output_dir": str(tmp_path)}), str(tmp_path))
    assert json.load(open(path))["arch"] == "vit_tiny"


def test_cli_help_and_bad_preset_exit_code(capsys):
    from dino_fast.cli import main
    assert main(["train", "--preset", "nope"]) == 2
    assert "choices: demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--grad_accum_steps" in out and "--teacher_temp" in out and "Micro-batches per optimizer step" in out


def test_presets_are_valid():
    for name in PRESETS:
        cfg = resolve(name, {"data_path": "demo"})
        assert cfg.preset == name


# ---- schedules (written out per iteration, independently) --------------------------------------
def test_schedules_equal_reference_formulas():
    cfg = resolve("demo", {"epochs": 5, "warmup_epochs": 2, "lr": 0.0005, "min_lr": 1e-6,
                           "batch_size_per_gpu": 32, "momentum_teacher": 0.996})
    n_ep, world = 7, 4
    s = build_schedules(cfg, n_ep, world)
    total, warm = 5 * n_ep, 2 * n_ep
    base = 0.0005 * 32 * world / 256
    for i in range(total):
        if i < warm:
            lr = base * i / (warm - 1)
        else:
            j, n = i - warm, total - warm
            lr = 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * j / n))
        wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / total))
        m = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * i / total))
        assert s.lr[i] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        assert s.wd[i] == pytest.approx(wd, rel=1e-12)
        assert s.momentum[i] == pytest.approx(m, rel=1e-12)
    assert len(s.lr) == len(s.wd) == len(s.momentum) == total
    from dino_fast.train.build import build_loss
    loss = build_loss(resolve("demo", {"epochs": 10, "warmup_teacher_temp_epochs": 4, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07}), "cpu")
    want = [0.04 + (0.07 - 0.04) * e / 3 for e in range(4)] + [0.07] * 6
    np.testing.assert_allclose(loss.teacher_temp_schedule, want, rtol=1e-12)


# ---- optimizer pieces --------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.last_layer = nn.Linear(3, 2, bias=False)


def test_param_groups_no_decay_on_bias_and_norm():
    m = _Tiny()
    reg, noreg = get_params_groups(m)
    assert {id(p) for p in reg["params"]} == {id(m.fc.weight), id(m.last_layer.weight)}
    assert {id(p) for p in noreg["params"]} == {id(m.fc.bias), id(m.norm.weight), id(m.norm.bias)}
    assert noreg["weight_decay"] == 0.0


def test_clip_gradients_per_tensor_like_reference():
    m = _Tiny()
    grads = {n: torch.randn_like(p) * s for (n, p), s in zip(m.named_parameters(), (10, 0.01, 5, 0.1, 3))}
    for n, p in m.named_parameters():
        p.grad = grads[n].clone()
    norms = clip_gradients(m, 1.0)
    for (n, p), norm in zip(m.named_parameters(), norms.tolist()):
        g = grads[n]
        ref_norm = g.norm(2).item()
        coef = 1.0 / (ref_norm + 1e-6)
        want = g * coef if coef < 1 else g          # the reference's clip_gradients
        assert norm == pytest.approx(ref_norm, rel=1e-6)
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)
    cancel_gradients_last_layer(0, m, 1)
    assert m.last_layer.weight.grad is None and m.fc.weight.grad is not None
    m.last_layer.weight.grad = torch.ones(2, 3)
    cancel_gradients_last_layer(1, m, 1)
    assert m.last_layer.weight.grad is not None


def test_lars_step_matches_formula():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = LARS([{"params": [p]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, weight_decay=0.5, eta=0.001)
    p.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0, 2.0])
    opt.step()
    dp = torch.tensor([[1.0, 0.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])       # 2-D: weight decay + trust ratio
    q = 0.001 * 5.0 / dp.norm()
    torch.testing.assert_close(p.data, torch.tensor([[3.0, 4.0]]) - 0.1 * dp * q)
    torch.testing.assert_close(b.data, torch.tensor([1.0, 1.0]) - 0.1 * torch.tensor([2.0, 2.0]))  # 1-D: plain


def test_dry_run_prints_plan_with_the_model_parameter_count(tmp_path, capsys):
    from dino_fast.cli import main
    from dino_fast.model import DINOHead, vit_small
    assert main(["train", "--preset", "vit_s16_in1k", "--data_path", str(tmp_path), "--dry_run", "true",
                 "--gpu_memory", "24"]) == 0
    out = capsys.readouterr().out
    backbone = vit_small(patch_size=16)
    n = sum(p.numel() for p in backbone.parameters()) + sum(
        p.numel() for p in DINOHead(384, 65536, norm_last_layer=False).parameters())
    assert f"student built with {n:,} parameters" in out
    assert f"{n / 1e6:.2f} M" in out                                  # the plan counts the same model
    assert "Largest micro-batch per GPU that fits" in out and "24.0 GiB" in out
    assert not os.path.exists(tmp_path / "checkpoint.pth")            # trains nothing
