"""The default training step for 20 steps, against the plain torch step from the same weights
and crops.

default   what `auto` picks on CUDA: Triton DINO loss, Triton EMA, packed multi-crop attention
          (xformers where installed, else sdpa), bf16 autocast (dino_fast.train.step.train_step)
plain     the same step on the torch implementations: torch loss, foreach EMA, math attention
          run per resolution group (MultiCropWrapper packed=False), same autocast

On a GPU: ViT-S/16, batch 64, 2 x 224 + 10 x 96 crops, 20 steps, fresh crops each step; the
per-step losses must agree within bf16 tolerance (3 %), what the 20 steps did to the
student within 30 % (AdamW turns the rounding of tiny gradients into full-size updates),
and the teachers within 0.1 %. The test
reports loss, img/s, MFU and the speed-up over the plain step (record_property
"gpu_check_figures": `dino-fast bench --gpu-check` puts them in its summary). On the CPU
the same comparison runs tiny for 2 steps (Triton interpreter), so this code runs in CI.
"""
from __future__ import annotations

import time

import pytest
import torch

from dino_fast.kernels.dino_loss import resolve_impl
from dino_fast.model.flops import dino_step_flops_per_image
from dino_fast.train.build import build_loss, build_pair, prepare
from dino_fast.train.optim import build_optimizer, build_schedules, get_params_groups
from dino_fast.train.presets import resolve
from dino_fast.train.step import StepState, train_step
from tests.conftest import HAS_CUDA, requires_cuda

GPU = dict(arch="vit_small", patch_size=16, batch=64, steps=20, warmup=2, global_size=224, local_size=96,
           local_crops_number=10)
CPU = dict(arch="vit_tiny", patch_size=4, depth=1, out_dim=128, head_hidden_dim=32, head_bottleneck_dim=16,
           batch=2, steps=2, warmup=1, global_size=16, local_size=8, local_crops_number=2)
DEFAULT = dict(loss_impl="auto", ema_impl="auto", attention="auto")
PLAIN = dict(loss_impl="torch", ema_impl="foreach", attention="math")


def _config(shape: dict, impls: dict):
    over = {k: v for k, v in shape.items() if k not in ("batch", "steps", "warmup")}
    return resolve(None, {**over, **impls, "data_path": "demo", "batch_size_per_gpu": shape["batch"], "epochs": 10,
                          "warmup_epochs": 1, "freeze_last_layer": 0, "drop_path_rate": 0.0, "precision": "bf16"})


def _state(cfg, device, weights=None) -> StepState:
    torch.manual_seed(0)
    student, teacher = build_pair(cfg)
    if weights is not None:
        student.load_state_dict(weights[0])
        teacher.load_state_dict(weights[1])
    student, teacher, autocast, scaler = prepare(cfg, student, teacher, device, 1, False)
    if cfg.attention == "math":
        student.packed = teacher.packed = False          # the reference's per-resolution-group forward
    opt = build_optimizer("adamw", get_params_groups(student))
    return StepState(cfg, student, teacher, build_loss(cfg, device), opt, build_schedules(cfg, 10, 1),
                     autocast, scaler)


def _crops(shape, cfg, device, step):
    g = torch.Generator(device=device).manual_seed(1000 + step)
    b = shape["batch"]
    crops = [torch.randn(b, 3, cfg.global_size, cfg.global_size, device=device, generator=g) for _ in range(2)]
    return crops + [torch.randn(b, 3, cfg.local_size, cfg.local_size, device=device, generator=g)
                    for _ in range(cfg.local_crops_number)]


def _run(st, shape, cfg, device, crops):
    """(per-step losses as floats, seconds of the steps after the warm-up)."""
    losses, t0 = [], None
    for it in range(shape["steps"]):
        if it == shape["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        losses.append(train_step(st, crops[it], it, 0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [float(x) for x in losses], time.perf_counter() - t0


def _compare(device: torch.device, shape: dict, loss_tol: float, update_tol: float) -> dict:
    on_cpu = device.type != "cuda"
    # auto is torch / foreach on the CPU: there the default side asks for the kernels (interpreter)
    cfg = _config(shape, {**DEFAULT, **({"loss_impl": "triton", "ema_impl": "triton"} if on_cpu else {})})
    ref_cfg = _config(shape, PLAIN)
    fast = _state(cfg, device)
    ref = _state(ref_cfg, device, (fast.student.state_dict(), fast.teacher.state_dict()))
    crops = [_crops(shape, cfg, device, it) for it in range(shape["steps"])]
    start = [p.detach().float().clone() for p in fast.student.parameters()]
    start_teacher = [p.detach().float().clone() for p in fast.teacher.parameters()]
    if not on_cpu:   # what auto chose is the default path
        assert resolve_impl("auto", crops[0][0], cfg.local_crops_number + 2, 2) == "triton"
        assert fast.student.backbone.attention in ("xformers", "sdpa") and fast.student.packed
    l_fast, s_fast = _run(fast, shape, cfg, device, crops)
    l_ref, s_ref = _run(ref, shape, ref_cfg, device, crops)
    assert all(torch.isfinite(torch.tensor(l_fast + l_ref))), (l_fast, l_ref)
    for it, (a, b) in enumerate(zip(l_fast, l_ref)):
        assert abs(a - b) <= loss_tol * abs(b), f"step {it}: loss {a:.6g} (default) vs {b:.6g} (plain)"
    # what the steps did to the student (AdamW), default vs plain; the teachers (EMA) agree
    d_fast = torch.cat([(p.detach().float() - p0).flatten() for p, p0 in zip(fast.student.parameters(), start)])
    d_ref = torch.cat([(q.detach().float() - p0).flatten() for q, p0 in zip(ref.student.parameters(), start)])
    err = float((d_fast - d_ref).norm() / d_ref.norm())
    assert err <= update_tol, f"student update after {shape['steps']} steps: relative difference {err:.3g}"
    t_fast, t_ref = (torch.cat([p.float().flatten() for p in m.parameters()]) for m in (fast.teacher, ref.teacher))
    t_err = float((t_fast - t_ref).norm() / t_ref.norm())
    assert t_err <= 1e-3, f"teachers after {shape['steps']} steps: relative difference {t_err:.3g}"
    assert not torch.equal(t_ref, torch.cat([p.flatten() for p in start_teacher])), "the EMA never moved the teacher"
    n_timed = shape["steps"] - shape["warmup"]
    img_s, ref_img_s = shape["batch"] * n_timed / s_fast, shape["batch"] * n_timed / s_ref
    flops = dino_step_flops_per_image(fast.student.backbone, cfg.global_size, cfg.local_size, 2,
                                      cfg.local_crops_number, head=fast.student.head)
    from dino_fast.devices import bf16_peak_tflops
    return {"arch": f"{cfg.arch}/{cfg.patch_size}", "batch": shape["batch"], "steps": shape["steps"],
            "crops": f"2x{cfg.global_size}+{cfg.local_crops_number}x{cfg.local_size}",
            "attention": fast.student.backbone.attention, "loss_first": l_fast[0], "loss_last": l_fast[-1],
            "plain_loss_last": l_ref[-1], "img_per_s": img_s, "plain_img_per_s": ref_img_s,
            "speedup_vs_plain": img_s / ref_img_s,
            "mfu": img_s * flops / 1e12 / bf16_peak_tflops(device), "student_update_rel_diff": err}


@requires_cuda
def test_default_step_20_steps_matches_plain_step_cuda(record_property):
    figures = _compare(torch.device("cuda"), GPU, loss_tol=3e-2, update_tol=0.3)
    record_property("gpu_check_figures", figures)


@pytest.mark.skipif(HAS_CUDA, reason="the tiny CPU version of the test above")
def test_default_step_matches_plain_step_cpu_tiny():
    figures = _compare(torch.device("cpu"), CPU, loss_tol=1e-4, update_tol=1e-2)
    assert figures["steps"] == 2 and figures["img_per_s"] > 0
