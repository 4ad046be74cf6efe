"""The step's speed options measured against today's step, on one device in one run
(bench/test_step_options.py).

Each variant is the default step (dino_fast.train.step.train_step: packed multi-crop forward,
fused loss, multi-tensor EMA, AdamW foreach, eager) with one option changed; "combined" turns on
the ones that keep the method's numbers and cost no memory. Every variant starts from the same
weights and the same crops. Measured per variant:

    compile_s   first step minus a steady step (compilation, CUDA-graph recording, autotuning)
    ms, img_s   median steady step
    mfu         model FLOPs (dino_step_flops_per_image: student fwd+bwd on all crops, teacher
                fwd on the globals; recomputation and dropped rows are not counted, as usual
                for MFU) x img/s / the device's dense bf16 peak
    peak_mem    torch.cuda.max_memory_allocated over the steady steps (GPU only)
"""
from __future__ import annotations

import time

import torch

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "compile_blocks": {"compile": "blocks"},
    "compile_model": {"compile": "model"},
    "fused_optimizer": {"fused_optimizer": True},
    "ckpt_full": {"activation_checkpointing": "full"},
    "ckpt_selective": {"activation_checkpointing": "selective"},
    "efficient_drop_path": {"efficient_drop_path": True},
    "cuda_graph_teacher": {"compile": "blocks", "cuda_graph_teacher": True},
    "combined": {"compile": "blocks", "fused_optimizer": True, "efficient_drop_path": True},
}
CUDA_ONLY = ("cuda_graph_teacher",)
SAME_NUMBERS = ("compile_blocks", "compile_model", "fused_optimizer", "ckpt_full", "ckpt_selective",
                "cuda_graph_teacher")   # the first-step loss equals the baseline's (no change of draws)


def build_state(cfg, device: torch.device, world: int = 1, use_fsdp: bool = False,
                compile_backend: str | None = None):
    """The StepState of the training loop for `cfg` on `device` (seed 0 weights), compiled with
    `compile_backend` (None: inductor)."""
    from dataclasses import replace

    from dino_fast.train.build import build_loss, build_pair, prepare
    from dino_fast.train.compile import apply_compile
    from dino_fast.train.optim import build_optimizer, build_schedules, get_params_groups
    from dino_fast.train.step import StepState
    torch.manual_seed(0)
    student, teacher = build_pair(cfg)
    eager = replace(cfg, compile=False, cuda_graph_teacher=False)
    student, teacher, autocast, scaler = prepare(eager, student, teacher, device, world, use_fsdp)
    student, teacher = apply_compile(cfg, student, teacher, device, backend=compile_backend)
    loss = build_loss(cfg, device)
    opt = build_optimizer(cfg.optimizer, get_params_groups(student), fused=cfg.fused_optimizer)
    return StepState(cfg, student, teacher, loss, opt, build_schedules(cfg, niter_per_ep=10, world_size=world),
                     autocast, scaler, use_fsdp)


def crops_for(cfg, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    b = cfg.batch_size_per_gpu
    return ([torch.randn(b, 3, cfg.global_size, cfg.global_size, device=device, generator=g) for _ in range(2)]
            + [torch.randn(b, 3, cfg.local_size, cfg.local_size, device=device, generator=g)
               for _ in range(cfg.local_crops_number)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, device: torch.device, *, warmup: int = 2, iters: int = 5, compile_backend: str | None = None) -> dict:
    """Build, run the first step (timed: compile_s), warm up, time `iters` steps; the raw numbers."""
    from dino_fast.train.step import train_step
    st = build_state(cfg, device, compile_backend=compile_backend)
    crops = crops_for(cfg, device)
    _sync(device)
    t0 = time.perf_counter()
    first_loss = float(train_step(st, crops, 0, 1))   # a host read: outside the timed steps
    first_s = time.perf_counter() - t0
    for i in range(warmup):
        train_step(st, crops, 1 + i, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        train_step(st, crops, 1 + warmup + i, 1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    ms = 1e3 * times[len(times) // 2]
    out = {"ms": ms, "first_loss": first_loss, "compile_s": max(0.0, first_s - ms / 1e3)}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    return out
