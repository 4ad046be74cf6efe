"""Shared by the step-option tests: a tiny DINO step state built like the training loop's, the
fixed multi-crop batches of test_grad_accum (B images, 2 global 16 px + 2 local 8 px crops: two
resolution groups in the packed sequence), and comparisons of two states after some steps."""
from __future__ import annotations

import pytest
import torch

from dino_fast.benchmark.step_options import build_state
from dino_fast.train.presets import resolve
from dino_fast.train.step import StepState, train_step
from tests.test_grad_accum import fixed_batches as batches  # noqa: F401  (B images per step, 2 + 2 crops)

B = 8
CFG = dict(patch_size=4, depth=2, out_dim=96, head_hidden_dim=64, head_bottleneck_dim=32, global_size=16,
           local_size=8, local_crops_number=2, batch_size_per_gpu=B, epochs=2, warmup_epochs=0, lr=0.1,
           min_lr=0.02, optimizer="sgd", clip_grad=0.5, freeze_last_layer=0, drop_path_rate=0.0,
           momentum_teacher=0.9, device="cpu", knn_eval=False, output_dir="unused", attention="sdpa")


def make_state(world: int = 1, use_fsdp: bool = False, compile_backend: str = "aot_eager", **over) -> StepState:
    """The step state of CFG + over on the CPU, compiled (if asked) with `compile_backend`."""
    cfg = resolve("demo", {**CFG, "batch_size_per_gpu": B // world, **over})
    return build_state(cfg, torch.device("cpu"), world, use_fsdp, compile_backend)


def run_steps(st: StepState, crops_per_step, epoch: int = 1) -> list[float]:
    return [float(train_step(st, crops, it=i, epoch=epoch)) for i, crops in enumerate(crops_per_step)]


def full(sd: dict) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in sd.items()}


def grads(model) -> dict:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def compare(a: StepState, b: StepState, la, lb, rtol=1e-5, atol=1e-6) -> None:
    """Losses, last gradients, student and teacher weights and the centre of two states."""
    assert la == pytest.approx(lb, rel=rtol, abs=10 * atol), (la, lb)
    ga, gb = grads(a.student), grads(b.student)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=lambda m: f"grad {k}: {m}")
    for part in ("student", "teacher"):
        sa, sb = full(getattr(a, part).state_dict()), full(getattr(b, part).state_dict())
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m: f"{part}.{k}: {m}")
    torch.testing.assert_close(a.dino_loss.center, b.dino_loss.center, rtol=rtol, atol=atol)
