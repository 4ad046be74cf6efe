"""`DINOLoss`: the drop-in for the reference `DINOLoss` (facebookresearch/dino
main_dino.py): same constructor, `forward(student_output, teacher_output,
epoch)` and state dict (`center`), on the fused functional loss
`dino_fast.kernels.dino_loss.dino_loss` (its math and memory traffic are
described there).

What this module adds to the kernel: the per-epoch teacher temperature
(linear warm-up, then constant), the centre buffer and its EMA
`c <- m c + (1-m) all_reduce(sum) / (rows * world_size)` after the loss, as
the reference, and the health statistics of the last call (`last_stats`).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from dino_fast.kernels.dino_loss import IMPLS, dino_loss, resolve_impl
from dino_fast.schedules import teacher_temp_schedule

logger = logging.getLogger(__name__)


class DINOLoss(nn.Module):
    """Drop-in for the reference `DINOLoss` (same constructor, forward and
    state dict), fused. Extra arguments: impl ("auto" = triton on CUDA
    tensors, else torch), n_teacher_views (default 2), compute_stats (fill
    `last_stats`), grad_in_forward (Liger-style gradient buffer)."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, impl: str = "auto", n_teacher_views: int = 2,
                 compute_stats: bool = True, grad_in_forward: bool = False):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"DINOLoss: impl must be one of {IMPLS}, got {impl!r}")
        if warmup_teacher_temp_epochs > nepochs:
            raise ValueError(f"DINOLoss: warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} exceeds "
                             f"nepochs={nepochs}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.n_teacher_views = n_teacher_views
        self.impl = impl
        self.compute_stats = compute_stats
        self.grad_in_forward = grad_in_forward
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.last_teacher_sum: torch.Tensor | None = None
        self._logged_impl: str | None = None

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, *,
                update_center: bool = True) -> torch.Tensor:
        """The reference's forward. `update_center=False` (gradient accumulation)
        skips the center update and its all-reduce and leaves the teacher column
        sum in `last_teacher_sum` (fp32 (1, K), this rank only); the caller adds
        the micro-batches' sums and calls `update_center_from_sum` once per step."""
        temp = float(self.teacher_temp_schedule[epoch])
        impl = resolve_impl(self.impl, student_output, self.ncrops, self.n_teacher_views)
        out = dino_loss(student_output, teacher_output, self.center, self.ncrops, temp, self.student_temp,
                        self.n_teacher_views, impl, self.grad_in_forward, return_stats=self.compute_stats)
        if impl != self._logged_impl:
            logger.info("DINOLoss: impl=%s (requested %s)", impl, self.impl)
            self._logged_impl = impl
        loss, colsum = out[0], out[1]
        if self.compute_stats:
            self.last_stats = out[2]
        if update_center:
            self.update_center_from_sum(colsum, len(teacher_output))
        else:
            self.last_teacher_sum = colsum
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """The reference's update from teacher logits (forward already does it)."""
        self.update_center_from_sum(teacher_output.float().sum(0, keepdim=True), len(teacher_output))

    @torch.no_grad()
    def update_center_from_sum(self, colsum: torch.Tensor, n_rows: int) -> None:
        """c <- m c + (1-m) all_reduce(colsum) / (n_rows * world_size): `colsum` is
        this rank's (1, K) sum of teacher logits over `n_rows` rows."""
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            from dino_fast.runtime.launch import named_collective   # dist_timeout error naming it
            named_collective("all_reduce DINO centre", dist.all_reduce, colsum)
            world_size = dist.get_world_size()
        batch_center = colsum / (n_rows * world_size)
        # a new tensor, as the reference: the backward still reads the old one
        self.center = (self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
                       ).to(self.center.dtype)


__all__ = ["DINOLoss"]
