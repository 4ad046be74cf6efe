"""The DINO loss written the obvious way: the reference `DINOLoss` of
facebookresearch/dino (main_dino.py), plus the health statistics computed
from materialised probabilities.

This is what the tests and the benches compare the fused loss
(`dino_fast.kernels.dino_loss`, `dino_fast.losses.dino_loss.DINOLoss`) against;
it is never used by the fused path (it imports only the names of the
statistics from it).
Differences to the original, both needed to make it a reference for more
than one setting and neither changing its numbers:
- the number of teacher views is an argument (the original hard-codes 2);
- the center all-reduce runs only when torch.distributed is initialised
  (the original assumes it always is).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dino_fast.kernels.dino_loss import STAT_NAMES


class DINOLossReference(nn.Module):
    """Reference DINO loss: per-pair loop, log_softmax per student view,
    center update with an all-reduce of the batch sum."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, n_teacher_views: int = 2):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.n_teacher_views = n_teacher_views
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a warm-up of the teacher temperature: too high a temperature makes
        # the beginning of training unstable
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)

        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(self.n_teacher_views)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    # skip the pair where teacher and student see the same view
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Update the center used for teacher output (EMA of the batch mean)."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        # ema update
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


@torch.no_grad()
def dino_health_stats_reference(student_output: torch.Tensor, teacher_output: torch.Tensor,
                                center: torch.Tensor, ncrops: int, teacher_temp: float,
                                student_temp: float = 0.1, n_teacher_views: int = 2) -> dict:
    """The health statistics of one DINO step from materialised probabilities
    (fp64): mean teacher / student entropy (nats), mean over the loss's view
    pairs of the batch-mean KL(q_i || p_v), mean teacher max probability, and
    the L2 norm of the center."""
    s = student_output.double() / student_temp
    t = (teacher_output.double() - center.double()) / teacher_temp
    log_p = F.log_softmax(s, dim=-1)                     # (ncrops*B, K)
    log_q = F.log_softmax(t, dim=-1)                     # (n_teacher_views*B, K)
    p, q = log_p.exp(), log_q.exp()
    teacher_entropy = -(q * log_q).sum(-1).mean()
    student_entropy = -(p * log_p).sum(-1).mean()
    log_ps, qs, log_qs = log_p.chunk(ncrops), q.chunk(n_teacher_views), log_q.chunk(n_teacher_views)
    kls = []
    for i in range(n_teacher_views):
        for v in range(ncrops):
            if v == i:
                continue
            kls.append((qs[i] * (log_qs[i] - log_ps[v])).sum(-1).mean())
    # keyed by STAT_NAMES, in its order
    return dict(zip(STAT_NAMES, (teacher_entropy, student_entropy, torch.stack(kls).mean(),
                                 q.max(-1).values.mean(), center.double().norm())))
