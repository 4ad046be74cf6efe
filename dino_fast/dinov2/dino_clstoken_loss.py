"""DINOv2's / DINOv3's CLS-token DINO loss, fused: a drop-in for
`dinov2.loss.DINOLoss` (same constructor, methods, state dict and numbers).

    loss = DINOLoss(out_dim)                                          # center: (1, out_dim)
    q = loss.sinkhorn_knopp_teacher(teacher_logits, teacher_temp)     # (T*B, K) fp32, rows sum to 1
    q = loss.softmax_center_teacher(teacher_logits, teacher_temp)     # or: EMA centring
    loss.update_center(teacher_logits)                                # applied at the next softmax_center_teacher
    # DINOv2: sequences of crops, the sum over crop pairs of the mean over rows
    l = loss(student_logits.chunk(n_crops), q.view(T, B, K))
    # DINOv3: (S, B, K) student logits, (T, B, K) probabilities, the mean over pairs
    l = loss(student_logits.view(S, B, K), q.view(T, B, K), ignore_diagonal=True)

With `materialize=False` the centrings return a `SoftmaxTeacher` (teacher
logits + per-prototype shift + per-row lse) instead of the (T*B, K)
probabilities; `forward` takes it in place of the (T, B, K) tensor (T*B rows,
crop-major) and the probabilities are recomputed inside the loss kernels,
never written. Sinkhorn-Knopp runs in the log domain (finite where DINOv2's
plain exp overflows, equal to it elsewhere) and works with or without
torch.distributed. No host synchronisation anywhere.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_fast.dinov2.center import LazyCenter
from dino_fast.kernels.sinkhorn_knopp import sinkhorn_knopp
from dino_fast.kernels.softmax_ce import softmax_ce
from dino_fast.kernels.softmax_teacher import IMPLS, SoftmaxTeacher, softmax_teacher

logger = logging.getLogger(__name__)


def _n_crops(teacher, B: int) -> int:
    if isinstance(teacher, SoftmaxTeacher):
        return len(teacher) // B if B else 1
    if isinstance(teacher, torch.Tensor):
        if teacher.dim() != 3:
            raise ValueError(f"DINOLoss: teacher_probs must be (teacher crops, B, K), got {tuple(teacher.shape)}")
        return teacher.shape[0]
    return len(teacher)


class DINOLoss(LazyCenter, nn.Module):
    """DINOv2's `DINOLoss`, fused. Extra keyword arguments: impl ("auto" =
    Triton on CUDA tensors, else torch; "triton"; "torch") and process_group
    (the group the centre and Sinkhorn-Knopp reduce over; default: all ranks).
    After each forward, `last_stats` holds the mean student entropy (and the
    teacher's entropy / max probability when this module computed the teacher)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 impl: str = "auto", process_group=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"DINOLoss: impl must be one of {IMPLS}, got {impl!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self.process_group = process_group
        self._init_center((1, out_dim))
        self.last_stats: dict[str, torch.Tensor] = {}
        self._teacher_stats: dict[str, torch.Tensor] = {}

    def _batch_sum(self, teacher_output: torch.Tensor) -> torch.Tensor:
        return torch.sum(teacher_output, dim=0, keepdim=True, dtype=torch.float32)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               update_centers: bool = True, *, materialize: bool = True):
        """softmax((teacher_output - center) / teacher_temp) after applying the
        pending centre update (DINOv3's update_centers=False skips that)."""
        if update_centers:
            self.apply_center_update()
        if materialize:
            return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)
        teacher = softmax_teacher(teacher_output.reshape(-1, teacher_output.shape[-1]), teacher_temp,
                                  self.center, impl=self.impl)
        self._teacher_stats = teacher.stats()
        return teacher

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                               *, materialize: bool = True):
        """Sinkhorn-Knopp probabilities of teacher_output (rows, K): fp32 (rows, K)
        with rows summing to 1, or with materialize=False a SoftmaxTeacher."""
        teacher = sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, impl=self.impl,
                                 group=self.process_group, materialize=False)
        self._teacher_stats = teacher.stats()
        return teacher.materialize(self.impl) if materialize else teacher

    def forward(self, student_output_list=None, teacher_out_softmaxed_centered_list=None,
                ignore_diagonal: bool = False, *, student_logits=None, teacher_probs=None) -> torch.Tensor:
        """Cross-entropy between the softmax outputs of the teacher and the student.

        DINOv2's form: sequences of student crops (each (..., K)) and of teacher
        probability crops (or a (T, B, K) tensor): -sum_s sum_t mean_rows <t, log_softmax(s / student_temp)>.
        DINOv3's form (a student tensor): student_logits (S, B, K), teacher_probs
        (T, B, K) or a SoftmaxTeacher of T*B rows: the mean over the S*T crop
        pairs (without the pairs (s, s) under ignore_diagonal) and the batch.
        """
        student = student_output_list if student_output_list is not None else student_logits
        teacher = teacher_out_softmaxed_centered_list if teacher_out_softmaxed_centered_list is not None \
            else teacher_probs
        if student is None or teacher is None:
            raise TypeError("DINOLoss.forward: pass the student logits and the teacher probabilities "
                            "(student_output_list / teacher_out_softmaxed_centered_list, or DINOv3's "
                            "student_logits / teacher_probs)")
        if isinstance(student, torch.Tensor):
            if student.dim() != 3:
                raise ValueError(f"DINOLoss: student_logits must be (student crops, B, K), got "
                                 f"{tuple(student.shape)}; DINOv2's form takes a list of crops")
            S, B, _ = student.shape
            T = _n_crops(teacher, B)
            pairs = S * T - (min(S, T) if ignore_diagonal else 0)
            scale = 1.0 / (B * pairs) if B * pairs else 0.0
        else:
            student = list(student)
            if not student:
                raise ValueError("DINOLoss: student_output_list is empty; pass at least one crop")
            B = student[0].numel() // student[0].shape[-1]
            scale = 1.0 / B if B else 0.0
        loss, stats = softmax_ce(student, teacher, student_temp=self.student_temp, ignore_diagonal=ignore_diagonal,
                                 scale=scale, impl=self.impl, return_stats=True)
        self.last_stats = {**self._teacher_stats, **stats}
        return loss
