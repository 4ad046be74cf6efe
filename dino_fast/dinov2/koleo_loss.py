"""The KoLeo regulariser of DINOv2 / DINOv3 (Kozachenko-Leonenko entropy
estimator, Sablayrolles et al. 2018): drop-ins for `dinov2.loss.KoLeoLoss` and
DINOv3's `KoLeoLossDistributed`.

    loss = -mean_i log(|| x_i - x_nn(i) + eps ||_2 + eps),  x = L2-normalised rows,
    nn(i) = argmax_{j != i} <x_i, x_j>

One GEMM (B x B dot products), a row argmax with the diagonal excluded, a
gather and a distance, under autocast disabled and in fp32, as DINOv2. This
stays plain PyTorch on purpose: at DINOv2's sizes (B = 64 CLS features of
width 1024 per crop) the GEMM is 8 MFLOP and the whole op moves ~0.5 MB, so
it is bound by its five launches, not by bandwidth or FLOPs; a Triton kernel
fusing argmax + gather + distance would save three tiny launches and needs
its own backward, while cuBLAS already runs the only non-trivial part. The
nearest-neighbour search runs without autograd (its result is integer
indices; DINOv2 builds and discards that graph).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


class KoLeoLoss(nn.Module):
    """DINOv2's `KoLeoLoss`: forward(student_output (B, D), eps=1e-8) -> 0-dim fp32."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (DINOv2's name)
        """Index of each row's nearest other row of the L2-normalised x (B, D)."""
        dots = torch.mm(x, x.t())                                  # (B, B)
        dots.fill_diagonal_(-1)                                    # never the row itself
        return dots.argmax(dim=1)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        with _no_autocast(student_output):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)    # (B, D)
            nn_idx = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[nn_idx])                   # (B,)
            return -torch.log(distances + eps).mean()


class KoLeoLossDistributed(nn.Module):
    """DINOv3's `KoLeoLossDistributed(topk=1, loss_group_size=None)`: each rank's
    rows find their top-k neighbours among the rows of its group of ranks
    (all-gathered with autograd; default group = every rank, i.e. the global
    batch). Without torch.distributed the group is this process's batch."""

    def __init__(self, topk: int = 1, loss_group_size: int | None = None, *, process_group=None):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)
        self.topk = topk
        self.loss_group_size = loss_group_size
        self.process_group = process_group

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: torch.Tensor, all_x: torch.Tensor, rank: int) -> torch.Tensor:  # noqa: N802
        """Top-k neighbour indices into all_x (group_B, D) of x (local_B, D),
        whose rows are all_x[rank * local_B:][:local_B] (excluded)."""
        dots = torch.mm(x, all_x.t())                              # (local_B, group_B)
        local_b = dots.shape[0]
        dots[torch.arange(local_b, device=x.device), rank * local_b + torch.arange(local_b, device=x.device)] = -1
        return torch.topk(dots, dim=1, k=self.topk).indices        # (local_B, topk)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        with _no_autocast(student_output):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)    # (local_B, D)
            if dist.is_available() and dist.is_initialized():
                from torch.distributed.nn.functional import all_gather
                with warnings.catch_warnings():      # DINOv3's autograd all_gather; deprecated in torch 2.x
                    warnings.simplefilter("ignore", FutureWarning)
                    all_x = torch.cat(all_gather(x, group=self.process_group or dist.group.WORLD), dim=0)
                world_size = dist.get_world_size(self.process_group)
                rank = dist.get_rank(self.process_group)
            else:
                all_x, world_size, rank = x, 1, 0
            local_b, global_b = len(x), len(all_x)
            group_size = self.loss_group_size if self.loss_group_size is not None else global_b
            if group_size % local_b != 0:
                raise ValueError(f"KoLeoLossDistributed: loss_group_size {group_size} must be a multiple of the "
                                 f"local batch size {local_b}")
            if global_b % group_size != 0:
                raise ValueError(f"KoLeoLossDistributed: the global batch size {global_b} must be divisible by "
                                 f"loss_group_size {group_size}")
            n_groups = global_b // group_size
            ranks_per_group = world_size // n_groups
            group_x = all_x.view(n_groups, group_size, x.shape[1])[rank // ranks_per_group]   # (group_size, D)
            nn_idx = self.pairwise_NNs_inner(x, group_x, rank % ranks_per_group)             # (local_B, topk)
            x_rep = x.unsqueeze(1).expand(-1, self.topk, -1).flatten(0, 1)                   # (local_B*topk, D)
            distances = self.pdist(x_rep, group_x[nn_idx].flatten(0, 1))
            return -torch.log(distances + eps).mean()
