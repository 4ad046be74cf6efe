"""DINOv2's / DINOv3's iBOT masked-patch loss, fused: a drop-in for
`dinov2.loss.iBOTPatchLoss` (same constructor, methods, state dict and numbers).

    loss = iBOTPatchLoss(patch_out_dim)                               # center: (1, 1, patch_out_dim)
    q = loss.sinkhorn_knopp_teacher(teacher_masked_logits, teacher_temp, n_masked_patches_tensor)  # (N, K)
    l = loss.forward_masked(student_masked_logits, q, student_masks_flat=masks,   # (N, K), (N, K), (images, P)
                            n_masked_patches=N, masks_weight=masks_weight)       # masks_weight: (N,)

    loss = -sum_n w_n <q_n, log_softmax(s_n / student_temp)> / images,  w_n = 1 / (masked patches of n's image)

Masked tokens are in DINOv2's order (image-major, the flattened mask's True
positions). Without masks_weight the weights are computed on the device from
the mask (no boolean indexing, so no host sync; DINOv2's `[masks]` syncs).
`sinkhorn_knopp_teacher` works without torch.distributed (DINOv2's calls
`dist.all_reduce` unconditionally) and leaves n_masked_patches_tensor alone
(DINOv2 all-reduces it in place; the count only scales Q by constants that
cancel, see kernels/sinkhorn_knopp.py).
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_fast.dinov2.center import LazyCenter
from dino_fast.kernels.sinkhorn_knopp import sinkhorn_knopp
from dino_fast.kernels.softmax_ce import softmax_ce
from dino_fast.kernels.softmax_teacher import IMPLS, SoftmaxTeacher, softmax_teacher


def masks_weight_from_masks(student_masks_flat: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """DINOv2's `(1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]`
    for the first n_tokens masked tokens, without boolean indexing (no host
    sync): token n belongs to the image whose cumulative masked count first
    exceeds n. An async device assert checks n_tokens == masks.sum()."""
    counts = student_masks_flat.reshape(student_masks_flat.shape[0], -1).sum(-1)     # (images,)
    ends = counts.cumsum(0)
    torch._assert_async(ends[-1] == n_tokens, "iBOTPatchLoss: the number of masked tokens differs from "
                                              "student_masks_flat.sum(); pass n_masked_patches / masks_weight")
    image = torch.searchsorted(ends, torch.arange(n_tokens, device=counts.device), right=True)
    image = image.clamp(max=counts.shape[0] - 1)
    return (1.0 / counts.clamp(min=1).float())[image]


class iBOTPatchLoss(LazyCenter, nn.Module):  # noqa: N801 (DINOv2's name)
    """DINOv2's `iBOTPatchLoss`, fused. Extra keyword arguments: impl and
    process_group, as `dino_fast.dinov2.DINOLoss`."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 impl: str = "auto", process_group=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"iBOTPatchLoss: impl must be one of {IMPLS}, got {impl!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self.process_group = process_group
        self._init_center((1, 1, patch_out_dim))
        self.last_stats: dict[str, torch.Tensor] = {}
        self._teacher_stats: dict[str, torch.Tensor] = {}

    @property
    def len_teacher_patch_tokens(self):          # DINOv2's attribute name
        return self.len_teacher_output

    def _batch_sum(self, teacher_patch_tokens: torch.Tensor) -> torch.Tensor:
        return torch.sum(teacher_patch_tokens.mean(1, dtype=torch.float32), dim=0, keepdim=True)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float,
                               update_centers: bool = True, *, materialize: bool = True):
        """softmax((teacher_patch_tokens - center) / teacher_temp) (center (1, 1, K)
        broadcasts as in DINOv2) after the pending centre update; with
        materialize=False a SoftmaxTeacher over the flattened rows."""
        if update_centers:
            self.apply_center_update()
        if materialize:
            return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)
        teacher = softmax_teacher(teacher_patch_tokens.reshape(-1, teacher_patch_tokens.shape[-1]), teacher_temp,
                                  self.center, impl=self.impl)
        self._teacher_stats = teacher.stats()
        return teacher

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor | int | None = None, n_iterations: int = 3,
                               *, materialize: bool = True):
        """Sinkhorn-Knopp probabilities of the masked tokens' teacher logits
        (N, K), over all ranks' tokens: fp32 (N, K), or a SoftmaxTeacher."""
        teacher = sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, impl=self.impl,
                                 group=self.process_group, materialize=False)
        self._teacher_stats = teacher.stats()
        return teacher.materialize(self.impl) if materialize else teacher

    def _loss(self, student: torch.Tensor, teacher, weights: torch.Tensor, n_images: int) -> torch.Tensor:
        if not isinstance(teacher, SoftmaxTeacher):
            teacher = [teacher.reshape(-1, teacher.shape[-1])]
        loss, stats = softmax_ce([student], teacher, student_temp=self.student_temp, weights=weights,
                                 scale=1.0 / max(n_images, 1), impl=self.impl, return_stats=True)
        self.last_stats = {**self._teacher_stats, **stats}
        return loss

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens, student_masks_flat: torch.Tensor
                ) -> torch.Tensor:
        """student_patch_tokens (B, N, K) logits, teacher_patch_tokens (B, N, K)
        probabilities (or a SoftmaxTeacher of B*N rows), student_masks_flat (B, N):
        the mean over images of the mean CE over each image's masked tokens."""
        B, N, K = student_patch_tokens.shape
        masks = student_masks_flat.reshape(B, N).float()
        weights = (masks / masks.sum(-1, keepdim=True).clamp(min=1.0)).reshape(B * N)
        return self._loss(student_patch_tokens.reshape(B * N, K), teacher_patch_tokens, weights, B)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked,
                       student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                       masks_weight: torch.Tensor | None = None) -> torch.Tensor:
        """student / teacher rows of the masked tokens ((N', K) logits; (N', K)
        probabilities or a SoftmaxTeacher), the first n_masked_patches of them
        used (default all); masks_weight (n,) or computed from student_masks_flat
        (images, P). Divided by the number of images."""
        s = student_patch_tokens_masked.reshape(-1, student_patch_tokens_masked.shape[-1])
        n = s.shape[0] if n_masked_patches is None else operator.index(n_masked_patches)
        t = teacher_patch_tokens_masked
        t = t.rows(0, n) if isinstance(t, SoftmaxTeacher) else t.reshape(-1, t.shape[-1])[:n]
        if masks_weight is None:
            masks_weight = masks_weight_from_masks(student_masks_flat, n)
        elif masks_weight.numel() != n:
            raise ValueError(f"iBOTPatchLoss.forward_masked: masks_weight has {masks_weight.numel()} elements for "
                             f"{n} masked tokens")
        return self._loss(s[:n], t, masks_weight, student_masks_flat.shape[0])
