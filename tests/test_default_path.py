"""The default GPU path as one piece, on the CPU: what `auto` picks on CUDA --
loss_impl=triton and ema_impl=triton (Triton interpreter here), packed multi-crop
attention on SDPA (auto without xformers; xformers is CUDA-only), bf16 mixed
precision (autocast, `cpu_autocast=True` here) and FSDP2 over 2 gloo processes --
trained for 3 steps and compared with

1. the same 2-process run on the plain torch implementations (loss_impl=torch, the
   reference per-parameter EMA loop, math attention): loss, student, teacher, centre;
2. a 1-process run of the default path on the same global batch (8 images; 4 per
   rank), which is also the 1-vs-N numerics check: both run under autocast with
   fp32 parameters, so LayerNorm, the head's L2 norm and weight norm see fp32
   weights on 1 and on N processes (checked with hooks), GEMMs run in bf16.

The optimizer is SGD (linear in the gradient), as tests/test_grad_accum.py: AdamW's
first steps are sign(g)·lr and turn bf16 round-off of near-zero gradients into
lr-sized differences. The starting centre is small (std 0.05) so the teacher is not
one-hot from the first step. Tolerances (bf16 compute, 8 mantissa bits; measured
differences in brackets, CPU): losses rel 1e-2 [4e-3]; after 3 steps of lr 1.0 x 8/256
student weights atol 1e-3 [2.5e-4] (they move by 2e-2), teacher (EMA 0.9) atol 2e-4
[4e-5], centre atol 1e-3 [3e-4].
"""
from __future__ import annotations

import os

import pytest
import torch

from dino_fast.train.build import build_loss, build_pair, prepare
from dino_fast.train.optim import build_optimizer, build_schedules, get_params_groups
from dino_fast.train.presets import resolve
from dino_fast.train.step import StepState, train_step
from tests._dist import run_distributed
from tests.test_grad_accum import fixed_batches, full

B, STEPS = 8, 3
BASE = dict(patch_size=4, depth=2, out_dim=96, head_hidden_dim=64, head_bottleneck_dim=32, global_size=16,
            local_size=8, local_crops_number=2, batch_size_per_gpu=B, epochs=2, warmup_epochs=0, lr=1.0,
            min_lr=0.02, optimizer="sgd", clip_grad=0.5, freeze_last_layer=0, drop_path_rate=0.0,
            momentum_teacher=0.9, device="cpu", knn_eval=False, output_dir="unused",
            precision="bf16", cpu_autocast=True, teacher_temp=0.04, warmup_teacher_temp=0.04)
DEFAULT = dict(loss_impl="triton", ema_impl="triton", attention="sdpa")      # auto on CUDA (no xformers)
PLAIN = dict(loss_impl="torch", ema_impl="loop", attention="math")
TOL = {"loss": 1e-2, "student": 1e-3, "teacher": 2e-4, "center": 1e-3}   # see the docstring


def make_state(impls: dict, world: int, use_fsdp: bool) -> StepState:
    cfg = resolve("demo", {**BASE, **impls, "batch_size_per_gpu": B // world}, check=False)
    torch.manual_seed(0)
    student, teacher = build_pair(cfg)
    device = torch.device("cpu")
    student, teacher, autocast, scaler = prepare(cfg, student, teacher, device, world, use_fsdp)
    loss = build_loss(cfg, device)
    loss.center.normal_(std=0.05, generator=torch.Generator().manual_seed(1))   # a non-trivial centre
    opt = build_optimizer(cfg.optimizer, get_params_groups(student))
    sched = build_schedules(cfg, niter_per_ep=STEPS, world_size=world)
    return StepState(cfg, student, teacher, loss, opt, sched, autocast, scaler, use_fsdp)


def _probe(st: StepState) -> dict:
    """dtypes seen inside the student's forward: LayerNorm weights and inputs, the head's
    weight-norm parameters, the output of a GEMM (bf16 under autocast)."""
    seen = {}
    bb, head = st.student.backbone, st.student.head
    hooks = [bb.blocks[0].norm1.register_forward_pre_hook(
                 lambda m, a: seen.update(ln_weight=m.weight.dtype, ln_input=a[0].dtype)),
             bb.norm.register_forward_pre_hook(lambda m, a: seen.update(final_ln_weight=m.weight.dtype)),
             head.last_layer.register_forward_pre_hook(
                 lambda m, a: seen.update(weight_v=m.weight_v.dtype, weight_g=m.weight_g.dtype)),
             bb.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: seen.update(gemm_out=out.dtype))]
    return seen, hooks


def run(st: StepState, batches) -> dict:
    seen, hooks = _probe(st)
    losses = [train_step(st, crops, it=i, epoch=1).detach().clone() for i, crops in enumerate(batches)]
    for h in hooks:
        h.remove()
    losses = torch.stack(losses)
    if st.use_fsdp:
        torch.distributed.all_reduce(losses)
        losses /= torch.distributed.get_world_size()
    return {"losses": losses.tolist(), "student": full(st.student.state_dict()),
            "teacher": full(st.teacher.state_dict()), "center": st.dino_loss.center.clone(), "dtypes": seen}


def _two_proc(rank, world, out_dir):
    torch.set_num_threads(1)
    batches = fixed_batches(STEPS, rank, world)
    res = {name: run(make_state(impls, world, True), batches) for name, impls in
           (("default", DEFAULT), ("plain", PLAIN))}
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "two.pt"))


def compare(a: dict, b: dict, what: str):
    assert a["losses"] == pytest.approx(b["losses"], rel=TOL["loss"]), (what, a["losses"], b["losses"])
    for part in ("student", "teacher"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=TOL[part], msg=f"{what}: {part}.{k}")
    torch.testing.assert_close(a["center"], b["center"], rtol=0, atol=TOL["center"], msg=f"{what}: centre")


FP32_SIDE = dict(ln_weight=torch.float32, ln_input=torch.float32, final_ln_weight=torch.float32,
                 weight_v=torch.float32, weight_g=torch.float32, gemm_out=torch.bfloat16)


def test_default_path_two_processes_vs_plain_torch_and_one_process(tmp_path):
    torch.set_num_threads(1)
    run_distributed(_two_proc, str(tmp_path), world_size=2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = run(make_state(DEFAULT, 1, False), fixed_batches(STEPS))

    # the same numerics on 1 and 2 processes: autocast on both, fp32 weights where no GEMM
    assert one["dtypes"] == two["default"]["dtypes"] == two["plain"]["dtypes"] == FP32_SIDE
    compare(two["default"], two["plain"], "triton loss + triton EMA + sdpa vs plain torch (2 processes)")
    compare(two["default"], one, "2 processes vs 1 process (same global batch)")
    # the runs trained: weights moved well beyond the tolerance, the centre too
    start = make_state(DEFAULT, 1, False)
    moved = max((one["student"][k] - v).abs().max().item() for k, v in full(start.student.state_dict()).items())
    assert moved > 10 * TOL["student"], moved
    assert (one["center"] - start.dino_loss.center).abs().max() > 10 * TOL["center"]
    assert one["losses"][-1] < one["losses"][0] - 1.0, one["losses"]
