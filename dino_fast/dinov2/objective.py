"""The dinov2 method's objective: DINOv2's loss modules (the fused drop-ins of
this package) combined with DINOv2's weights and pair counts
(dinov2/train/ssl_meta_arch.py, the same numbers as DINOv3's compute_losses):

    loss = w_dino * (dino_local + dino_global) + w_koleo * koleo_sum + w_ibot * ibot + w_gram * gram
    dino_local  = sum over the 2 x n_local (teacher global, student local) pairs of mean_b CE / n_terms
    dino_global = sum over the 2 (teacher A, student B) and (B, A) pairs of mean_b CE / n_terms
    n_terms     = 2 * n_local + 2
    koleo_sum   = KoLeo(student CLS of global crop 1) + KoLeo(... crop 2)  (backbone features)
    ibot        = sum over masked patches of w_n CE_n / (global-crop images), w_n = 1 / (masked patches of n's image)

Teacher probabilities by softmax centring (EMA centres, updated lazily as
DINOv2) or Sinkhorn-Knopp, for both heads, kept implicit (a SoftmaxTeacher:
logits + shift + lse, never written as (rows, K) probabilities). The state
dict holds the centres (`dino_loss.center`, `ibot_patch_loss.center`).
`last_stats` (0-dim device tensors, read by the loop at logging steps):
the unweighted terms dino_local, dino_global, ibot, koleo (mean over the two
crops, DINOv2 logs weight x that), gram; the DINO head's teacher_entropy /
teacher_max_prob / student_entropy and the iBOT head's ibot_teacher_entropy /
ibot_teacher_max_prob / ibot_student_entropy.
"""
from __future__ import annotations

import torch
from torch import nn

from dino_fast.dinov2.dino_clstoken_loss import DINOLoss
from dino_fast.dinov2.ibot_patch_loss import iBOTPatchLoss
from dino_fast.dinov2.koleo_loss import KoLeoLoss

TERM_NAMES = ("dino_local", "dino_global", "ibot", "koleo", "gram")
IBOT_STAT_NAMES = ("ibot_teacher_entropy", "ibot_teacher_max_prob", "ibot_student_entropy")


class DINOv2Objective(nn.Module):
    def __init__(self, cfg, impl: str = "auto"):
        super().__init__()
        self.centering = cfg.centering
        self.w_dino, self.w_ibot, self.w_koleo = cfg.dino_loss_weight, cfg.ibot_loss_weight, cfg.koleo_loss_weight
        self.dino_loss = DINOLoss(cfg.out_dim, impl=impl)
        ibot_dim = cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, impl=impl)
        self.koleo_loss = KoLeoLoss()
        self.center_momentum = self.dino_loss.center_momentum
        self.use_gram = cfg.gram_loss_weight > 0
        self.extra_stat_names = TERM_NAMES[:4] + (("gram",) if self.use_gram else ()) + IBOT_STAT_NAMES
        self.last_stats: dict[str, torch.Tensor] = {}
        self.gram = None           # a GramAnchor (gram.py), set by the builder; not part of the state dict

    def state_dict(self, *args, **kwargs):
        """The centres with their pending lazy update applied first (the same update the next step
        would apply), so a checkpoint holds it and a resumed run continues exactly."""
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()
        return super().state_dict(*args, **kwargs)

    # ---- teacher probabilities ----
    @torch.no_grad()
    def teacher_dino(self, logits: torch.Tensor, temp: float):
        """(2B, K) teacher CLS logits -> implicit probabilities (a SoftmaxTeacher of 2B rows)."""
        if self.centering == "softmax":
            q = self.dino_loss.softmax_center_teacher(logits, temp, materialize=False)
            self.dino_loss.update_center(logits)
            return q
        return self.dino_loss.sinkhorn_knopp_teacher(logits, temp, materialize=False)

    @torch.no_grad()
    def teacher_ibot(self, logits: torch.Tensor, temp: float):
        """(n_masked, K) teacher logits of the masked patches -> implicit probabilities."""
        if self.centering == "softmax":
            q = self.ibot_patch_loss.softmax_center_teacher(logits, temp, materialize=False)
            self.ibot_patch_loss.update_center(logits.unsqueeze(0))   # the centre: mean over the masked tokens
            return q
        return self.ibot_patch_loss.sinkhorn_knopp_teacher(logits, temp, materialize=False)

    # ---- the loss ----
    def forward(self, s: dict, q_dino, q_ibot, masks, n_images: int, gram=None, gram_weight: float = 0.0
                ) -> torch.Tensor:
        """s: the student network's outputs (network.py); q_dino / q_ibot: teacher_dino / teacher_ibot
        results (q_ibot None: no masked patch); masks: the step's MaskBatch (or None); gram: the
        0-dim Gram loss or None. Returns the 0-dim weighted total; the terms go to last_stats."""
        g, loc = s["global_logits"], s["local_logits"]
        B = n_images // 2
        K = g.shape[-1]
        n_local = loc.shape[0] // B if B else 0
        n_terms = 2 * n_local + 2
        zero = g.float().sum() * 0.0
        stats = {}
        if n_local:
            local = self.dino_loss(student_logits=loc.view(n_local, B, K), teacher_probs=q_dino)
            dino_local = local * (2 * n_local / n_terms)
            stats.update(self.dino_loss.last_stats)
        else:
            dino_local = zero
        glob = self.dino_loss(student_logits=g.view(2, B, K), teacher_probs=q_dino, ignore_diagonal=True)
        dino_global = glob * (2 / n_terms)
        if not n_local:
            stats.update(self.dino_loss.last_stats)
        koleo_sum = sum(self.koleo_loss(c) for c in s["global_cls"].chunk(2))
        if q_ibot is not None and masks is not None and masks.n_masked:
            ibot = self.ibot_patch_loss.forward_masked(s["patch_logits"], q_ibot, student_masks_flat=masks.masks,
                                                       n_masked_patches=masks.n_masked, masks_weight=masks.weights)
            ib = self.ibot_patch_loss.last_stats
            stats.update({f"ibot_{k}": ib[k] for k in ("teacher_entropy", "teacher_max_prob", "student_entropy")
                          if k in ib})
        else:
            ibot = zero
        nan = torch.full((), float("nan"), device=g.device)
        for k in ("teacher_entropy", "teacher_max_prob", "student_entropy"):   # the same keys on every rank
            stats.setdefault(k, nan)
            stats.setdefault(f"ibot_{k}", nan)
        total = self.w_dino * (dino_local + dino_global) + self.w_koleo * koleo_sum + self.w_ibot * ibot
        terms = {"dino_local": dino_local, "dino_global": dino_global, "ibot": ibot, "koleo": koleo_sum / 2}
        if self.use_gram:
            gram = zero if gram is None else gram
            total = total + gram_weight * gram
            terms["gram"] = gram
        self.last_stats = {**{k: v.detach().float() for k, v in stats.items()},
                           **{k: v.detach().float() for k, v in terms.items()}}
        return total
