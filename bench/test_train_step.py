"""One full DINO training step (data already on the device): dino-fast vs a
reference-style step, timed in the same run, as img/s and MFU.

dino-fast : packed multi-crop forward (every block once per step for all crops),
            fused DINOLoss, multi-tensor EMA, no host sync (dino_fast.train.step).
reference : main_dino.py's step: per-resolution-group forward (MultiCropWrapper
            packed=False), DINOLossReference, `.item()` on the loss, per-tensor
            clip_gradients with `.item()` per tensor, per-parameter EMA loop.
Both under bf16 autocast from the same weights and crops, AdamW, 2 x 224 + 10 x 96
crops: ViT-S/16 (batch 64) and ViT-B/8 (batch 32). FLOPs: the model's
dino_step_flops_per_image. On a GPU the records go to
bench/results/train_step_<device>.json; on the CPU (smoke) a 2-block ViT-tiny on
tiny crops runs and the first-step losses of both steps must agree.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark import bench_autocast, record, time_ms
from dino_fast.kernels.dino_loss_reference import DINOLossReference
from dino_fast.kernels.ema import ema_update_reference_
from dino_fast.model.flops import dino_step_flops_per_image
from dino_fast.train.build import build_loss, build_pair
from dino_fast.train.optim import build_optimizer, build_schedules, get_params_groups
from dino_fast.train.presets import resolve
from dino_fast.train.step import StepState, train_step

CASES = {  # name: (config overrides, batch per GPU)
    "vit_s16": (dict(arch="vit_small", patch_size=16), 64),
    "vit_b8": (dict(arch="vit_base", patch_size=8), 32),
}
SMOKE = dict(arch="vit_tiny", patch_size=4, depth=2, out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32,
             global_size=16, local_size=8, local_crops_number=4)




def _reference_clip(model, clip):
    """utils.clip_gradients of the reference (a host sync per tensor)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            coef = clip / (norm.item() + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)


def reference_step(st: StepState, crops, it: int, epoch: int) -> float:
    """main_dino.py train_one_epoch's body (bf16 autocast instead of fp16 + scaler)."""
    st.schedules.set_optimizer(st.optimizer, it)
    with torch.autocast(crops[0].device.type, dtype=torch.bfloat16, enabled=crops[0].is_cuda):
        teacher_output = st.teacher(crops[:2])
        student_output = st.student(crops)
        loss = st.dino_loss(student_output, teacher_output, epoch)
    value = loss.item()                                  # the reference's isfinite check
    st.optimizer.zero_grad()
    loss.backward()
    _reference_clip(st.student, st.cfg.clip_grad)
    st.optimizer.step()
    with torch.no_grad():
        ema_update_reference_(list(st.teacher.parameters()), list(st.student.parameters()),
                              float(st.schedules.momentum[it]))
    return value


def _states(cfg, device):
    torch.manual_seed(0)
    student, teacher = build_pair(cfg)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ref_student.packed = ref_teacher.packed = False                 # per-group forward
    autocast = lambda: bench_autocast(device)  # noqa: E731
    states = []
    for s, t, loss in ((student, teacher, build_loss(cfg, device)),
                       (ref_student, ref_teacher, DINOLossReference(
                           cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                           cfg.warmup_teacher_temp_epochs, cfg.epochs).to(device))):
        s, t = s.to(device), t.to(device)
        opt = build_optimizer("adamw", get_params_groups(s))
        states.append(StepState(cfg, s, t, loss, opt, build_schedules(cfg, 10, 1), autocast))
    return states


@pytest.mark.parametrize("case", ["smoke"] + list(CASES))
def test_train_step(benchmark, device, smoke, spec, case):
    if smoke != (case == "smoke"):
        pytest.skip("smoke case on the CPU only; real cases on a GPU only")
    over, batch = (SMOKE, 4) if smoke else CASES[case]
    cfg = resolve(None, {**over, "data_path": "demo", "batch_size_per_gpu": batch, "epochs": 10,
                         "warmup_epochs": 1, "freeze_last_layer": 0, "drop_path_rate": 0.0,
                         "local_crops_number": over.get("local_crops_number", 10),
                         "global_size": over.get("global_size", 224), "local_size": over.get("local_size", 96)})
    fast, ref = _states(cfg, device)
    g = torch.Generator(device=device).manual_seed(0)
    crops = [torch.randn(batch, 3, cfg.global_size, cfg.global_size, device=device, generator=g) for _ in range(2)]
    crops += [torch.randn(batch, 3, cfg.local_size, cfg.local_size, device=device, generator=g)
              for _ in range(cfg.local_crops_number)]

    # correctness: same weights, same crops -> the same first-step loss
    l_fast = float(train_step(fast, crops, 0, 1))
    l_ref = reference_step(ref, crops, 0, 1)
    assert torch.isfinite(torch.tensor([l_fast, l_ref])).all()
    assert l_fast == pytest.approx(l_ref, rel=2e-2 if device.type == "cuda" else 1e-4)

    iters = 2 if smoke else 10
    ms = time_ms(lambda: train_step(fast, crops, 1, 1), warmup=1 if smoke else 3, iters=iters)
    ref_ms = time_ms(lambda: reference_step(ref, crops, 1, 1), warmup=1 if smoke else 3, iters=iters)
    flops = batch * dino_step_flops_per_image(fast.student.backbone, cfg.global_size, cfg.local_size, 2,
                                              cfg.local_crops_number, head=fast.student.head)
    rec = record(ms, spec, flops=flops, ref_ms=ref_ms, variant=case, batch=batch,
                 img_s=batch * 1000 / ms, ref_img_s=batch * 1000 / ref_ms,
                 ref_mfu=flops / (ref_ms * 1e-3) / 1e12 / spec.bf16_tflops,
                 crops=f"2x{cfg.global_size}+{cfg.local_crops_number}x{cfg.local_size}")
    benchmark.extra_info.update(rec)
    if not smoke:
        save_record("train_step", rec["variant"], rec)
    benchmark.pedantic(lambda: train_step(fast, crops, 2, 1), rounds=1, iterations=1)
