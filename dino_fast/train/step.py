"""One optimizer step of DINO: forward → loss → backward → step → EMA, with
gradient accumulation, and no host synchronisation (nothing here reads a
device value on the host: the loss comes back as a device tensor).

Gradient accumulation (`grad_accum_steps = n`): the per-GPU batch B is split
into n micro-batches of B/n. Each micro-batch's loss is a mean over its B/n
images, so its gradient is scaled by 1/n and the accumulated gradient is the
gradient of the mean over all B. Every micro-batch sees the same centre (the
one of the step's start); the centre is then updated once, from the teacher
outputs of all micro-batches in crop-major order, exactly the rows the
single-batch step would have used. Under FSDP2 the gradient reduce-scatter
runs on the last micro-batch only. The optimizer step, the EMA and the
schedules advance once per step.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from .compile import mark_step
from .config import TrainConfig
from .optim import Schedules, cancel_gradients_last_layer, clip_gradients


@runtime_checkable
class StepLoss(Protocol):
    """What the step needs of the DINO loss (dino_fast.losses.dino_loss.DINOLoss has it)."""
    n_teacher_views: int
    last_teacher_sum: torch.Tensor | None
    """This rank's fp32 (1, K) teacher column sum of the last call with update_center=False."""

    def __call__(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, *,
                 update_center: bool = True) -> torch.Tensor:
        """The 0-dim loss of (ncrops*b, K) student and (n_teacher_views*b, K) teacher logits."""
        ...

    def update_center_from_sum(self, colsum: torch.Tensor, n_rows: int) -> None:
        """One centre update (and its all-reduce) from a teacher column sum over n_rows rows."""
        ...


@dataclass
class StepState:
    """Everything a step touches."""
    cfg: TrainConfig
    student: nn.Module
    teacher: nn.Module
    dino_loss: StepLoss
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None   # fp16 only
    use_fsdp: bool = False
    student_params: list = field(default_factory=list)
    teacher_params: list = field(default_factory=list)

    def __post_init__(self):
        # the EMA pairs: identical module structure, so parameters() orders match
        self.student_params = list(self.student.parameters())
        self.teacher_params = list(self.teacher.parameters())


def split_micro_batches(crops: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """[crop (B, 3, S, S)] -> n lists of [crop (B/n, 3, S, S)] (views)."""
    if n == 1:
        return [crops]
    m = crops[0].shape[0] // n
    return [[c[j * m:(j + 1) * m] for c in crops] for j in range(n)]


def train_step(st: StepState, crops: list[torch.Tensor], it: int, epoch: int) -> torch.Tensor:
    """One optimizer step at global iteration `it`; returns the mean loss (0-dim, device)."""
    cfg, loss_fn = st.cfg, st.dino_loss
    n = cfg.grad_accum_steps
    st.schedules.set_optimizer(st.optimizer, it)
    st.optimizer.zero_grad(set_to_none=True)

    # ---- forward → loss → backward, per micro-batch ----
    teacher_sum = None
    loss_sum = None
    for j, micro in enumerate(split_micro_batches(crops, n)):
        if st.use_fsdp:
            st.student.set_requires_gradient_sync(j == n - 1)  # reduce-scatter once per step
        with st.autocast():
            mark_step(cfg)   # --cuda_graph_teacher: a new CUDA-graph generation per micro-batch
            with torch.no_grad():
                teacher_out = st.teacher(micro[:2])        # (2*b, K): the 2 global crops only
            student_out = st.student(micro)                # (ncrops*b, K): all crops
            # every micro-batch uses the step's centre; it is updated once below
            loss = loss_fn(student_out, teacher_out, epoch, update_center=n == 1)
        scaled = loss / n if n > 1 else loss
        (st.scaler.scale(scaled) if st.scaler is not None else scaled).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if n > 1:
            teacher_sum = loss_fn.last_teacher_sum if teacher_sum is None else teacher_sum + loss_fn.last_teacher_sum
    if n > 1:  # one centre update (one all-reduce) from the teacher outputs of all micro-batches
        loss_fn.update_center_from_sum(teacher_sum, loss_fn.n_teacher_views * crops[0].shape[0])

    # ---- step: (unscale) → per-tensor clip → freeze last layer → optimizer → EMA ----
    def clip():
        if cfg.clip_grad:
            clip_gradients(st.student, cfg.clip_grad)
        cancel_gradients_last_layer(epoch, st.student, cfg.freeze_last_layer)
    update(st, it, clip)
    return loss_sum / n if n > 1 else loss_sum


def update(st: StepState, it: int, clip: Callable[[], None]) -> None:
    """After the backward: (unscale) → clip() → optimizer step (through the fp16 scaler) → EMA
    teacher ← m·teacher + (1−m)·student at iteration `it` (local shards under FSDP2). The DINO
    and dinov2 steps differ only in `clip` (per tensor + last-layer freeze vs per sub-network)."""
    if st.scaler is not None:
        st.scaler.unscale_(st.optimizer)
    clip()
    if st.scaler is not None:
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        st.optimizer.step()
    from dino_fast.kernels.ema import ema_update_
    ema_update_(st.teacher_params, st.student_params, float(st.schedules.momentum[it]), impl=st.cfg.ema_impl)
