"""Collapse and health monitoring for DINO training (paper Section 5.3).

DINO avoids collapse by balancing two operations on the teacher output:
centering (subtract a running mean c of the teacher logits) stops any one
dimension from dominating but on its own pushes the output towards the uniform
distribution; sharpening (a low teacher temperature tau_t) does the opposite.
The paper decomposes the loss H(P_t, P_s) = h(P_t) + KL(P_t || P_s): when either
operation is missing the KL goes to 0 (student and teacher output a constant)
and the teacher entropy h goes to ln(K) without sharpening (uniform collapse)
or to 0 without centering (one dimension dominates).

Two pieces live here:

- `health_stats_reference(...)`: the five health numbers computed the obvious
  way from materialised probabilities (the fused loss reports the same numbers in
  `DINOLoss.last_stats` without another pass over the logits).
- `CollapseMonitor`: fed the host floats of those stats at each logging step,
  it returns a warning a researcher can act on when, after the teacher
  temperature warm-up, the teacher entropy stays within `uniform_tol` of ln(K)
  or below `sharp_frac`·ln(K) for `patience` consecutive logging steps.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dino_fast.kernels.dino_loss import STAT_NAMES
from dino_fast.kernels.dino_loss_reference import dino_health_stats_reference


# ----------------------------------------------------------------------------- reference stats
@torch.no_grad()
def health_stats_reference(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                           ncrops: int, teacher_temp: float, student_temp: float = 0.1,
                           n_teacher_views: int = 2) -> dict[str, torch.Tensor]:
    """The five health statistics from materialised probabilities, in fp32.

    student_output: (ncrops*B, K) student logits, crop-major (as MultiCropWrapper returns them).
    teacher_output: (n_teacher_views*B, K) teacher logits of the global crops, crop-major.
    center: (1, K) the centre used for this step's loss (before its update).

    Returns 0-dim fp32 tensors:
      teacher_entropy  mean over the n_teacher_views*B rows of H(q), q = softmax((t - c) / teacher_temp), nats
      student_entropy  mean over the ncrops*B rows of H(p), p = softmax(s / student_temp), nats
      kl               mean over the loss's pairs (teacher view i, student view v != i) and the batch
                       of KL(q_i || p_v) = sum_k q log q - q log p
      center_norm      L2 norm of `center`
      teacher_max_prob mean over teacher rows of max_k q
    """
    if student_output.dim() != 2 or teacher_output.dim() != 2:
        raise ValueError(f"expected 2-D logits, got student {tuple(student_output.shape)} "
                         f"and teacher {tuple(teacher_output.shape)}")
    if student_output.shape[0] % ncrops or teacher_output.shape[0] % n_teacher_views or \
            student_output.shape[0] // ncrops != teacher_output.shape[0] // n_teacher_views:
        raise ValueError(f"student rows {student_output.shape[0]} / ncrops {ncrops} and teacher rows "
                         f"{teacher_output.shape[0]} / n_teacher_views {n_teacher_views} must give the "
                         f"same batch size")
    # one reference for the whole project: the loss's (fp64), returned in fp32
    stats = dino_health_stats_reference(student_output, teacher_output, center, ncrops, teacher_temp,
                                        student_temp, n_teacher_views)
    return {name: value.float() for name, value in stats.items()}


# ----------------------------------------------------------------------------- monitor
def _fmt(context: Mapping[str, Any], key: str, spec: str = "g") -> str:
    value = context.get(key)
    if value is None:
        return "?"
    if isinstance(value, bool):
        return str(value).lower()
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


class CollapseMonitor:
    """Warns when the teacher output has collapsed, in one of the paper's two modes.

    Args:
        out_dim: K, the head's output dimension; ln(K) is the entropy of a uniform output.
        patience: consecutive logging steps in the same collapsed state before warning.
        warmup_teacher_temp_epochs: no verdict during the teacher-temperature warm-up
            (epochs < this), where the teacher is deliberately soft or still changing.
        uniform_tol: uniform collapse when teacher_entropy >= (1 - uniform_tol)·ln(K).
        sharp_frac: one-dimension collapse when teacher_entropy < sharp_frac·ln(K).

    `update(stats, epoch, context)` after each logging step returns the warning text
    once per collapse episode (None otherwise); `collapsed` stays True while the
    collapsed state persists (and resets when the entropy recovers), `mode` is
    "uniform", "one-dimension" or None. Non-finite stats reset the count (a NaN loss
    is reported by the loop's own finiteness check).
    """

    def __init__(self, out_dim: int, patience: int = 5, warmup_teacher_temp_epochs: int = 0,
                 uniform_tol: float = 0.01, sharp_frac: float = 0.05):
        if out_dim < 2:
            raise ValueError(f"out_dim must be >= 2 for a collapse check, got {out_dim}")
        if patience < 1:
            raise ValueError(f"collapse patience must be >= 1 logging steps, got {patience}")
        if not 0 < uniform_tol < 1 or not 0 < sharp_frac < 1:
            raise ValueError(f"uniform_tol ({uniform_tol}) and sharp_frac ({sharp_frac}) must lie in (0, 1)")
        self.out_dim = out_dim
        self.patience = patience
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.uniform_tol = uniform_tol
        self.sharp_frac = sharp_frac
        self.log_k = math.log(out_dim)
        self.count = 0
        self.mode: str | None = None
        self.collapsed = False
        self.history: list[dict[str, float]] = []   # the stats of the current streak

    def classify(self, teacher_entropy: float) -> str | None:
        """'uniform', 'one-dimension' or None for one teacher-entropy value (nats)."""
        if not math.isfinite(teacher_entropy):
            return None
        if teacher_entropy >= (1.0 - self.uniform_tol) * self.log_k:
            return "uniform"
        if teacher_entropy < self.sharp_frac * self.log_k:
            return "one-dimension"
        return None

    def update(self, stats: Mapping[str, float], epoch: int, context: Mapping[str, Any] | None = None) -> str | None:
        """Feed one logging step's host-side stats; returns a warning string when collapse is confirmed.

        stats: floats keyed by STAT_NAMES (teacher_entropy, student_entropy, kl, teacher_max_prob, center_norm)
            (e.g. `{k: v.item() for k, v in loss.last_stats.items()}` at a logging step).
        context: the current values to quote in the remedies; recognised keys:
            teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, center_momentum,
            lr (current scheduled), base_lr (--lr), batch_size (total, all ranks), batch_size_per_gpu,
            world_size, grad_accum_steps, momentum_teacher, norm_last_layer, step, checkpoint.
        """
        context = context or {}
        mode = None if epoch < self.warmup_teacher_temp_epochs else self.classify(float(stats["teacher_entropy"]))
        if mode is None or mode != self.mode:
            self.count, self.history, self.collapsed = 0, [], False
        self.mode = mode
        if mode is None:
            return None
        self.count += 1
        self.history.append({k: float(stats[k]) for k in STAT_NAMES if k in stats})
        if self.count < self.patience or self.collapsed:
            return None
        self.collapsed = True
        return self.message(mode, stats, epoch, context)

    # -- the words ---------------------------------------------------------------------------
    def message(self, mode: str, stats: Mapping[str, float], epoch: int, context: Mapping[str, Any]) -> str:
        h = float(stats["teacher_entropy"])
        first = self.history[0]["teacher_entropy"] if self.history else h
        numbers = (f"teacher entropy {h:.3f} nats (first of the streak {first:.3f}) vs ln(K) = {self.log_k:.3f} "
                   f"for K = {self.out_dim} ({100 * h / self.log_k:.1f} % of ln K) for {self.count} consecutive "
                   f"logging steps after the teacher-temperature warm-up (epoch {epoch}"
                   + (f", step {context['step']}" if "step" in context else "") + "); "
                   + ", ".join(f"{k} {float(stats[k]):.4g}" for k in STAT_NAMES[1:] if k in stats) + ".")
        kl = stats.get("kl")
        kl_note = ""
        if kl is not None and math.isfinite(float(kl)):
            kl_note = (f" KL(teacher || student) = {float(kl):.3g}: "
                       + ("near 0, the student copies a constant teacher - the paper's signature of collapse."
                          if float(kl) < 0.05 * self.log_k else
                          "still clearly above 0, so the student has not yet fully followed the teacher."))
        tt, wtt = _fmt(context, "teacher_temp"), _fmt(context, "warmup_teacher_temp")
        wte, m = _fmt(context, "warmup_teacher_temp_epochs"), _fmt(context, "center_momentum")
        lr, bs = _fmt(context, "lr", ".3g"), _fmt(context, "batch_size")
        base_lr = _fmt(context, "base_lr", ".3g")
        bs_gpu, ws = _fmt(context, "batch_size_per_gpu"), _fmt(context, "world_size")
        mt = _fmt(context, "momentum_teacher")
        acc = _fmt(context, "grad_accum_steps")
        accum = f"; {acc} micro-batch(es) per step" if acc != "?" else ""
        tt_value = context.get("teacher_temp")
        at_limit = isinstance(tt_value, (int, float)) and tt_value >= 0.07
        soften = (f"--teacher_temp is already {tt} (the reference calls values above 0.07 unstable): rather "
                  f"lengthen the warm-up from --warmup_teacher_temp (now {wtt}) via "
                  f"--warmup_teacher_temp_epochs (now {wte})" if at_limit else
                  f"raise --teacher_temp (now {tt}) a little, staying at or below 0.07, or warm it up from "
                  f"--warmup_teacher_temp (now {wtt}) over more epochs (--warmup_teacher_temp_epochs, now {wte})")
        if mode == "uniform":
            text = (
                f"DINO collapse warning: UNIFORM collapse (paper Section 5.3) - the teacher outputs the "
                f"same flat distribution over all K = {self.out_dim} dimensions for every image, so the loss "
                f"sits near ln(K) = {self.log_k:.2f} and the features carry no information. {numbers}{kl_note}\n"
                f"Why: centering pushes the output towards uniform and only sharpening (a low teacher "
                f"temperature) counteracts it; here sharpening is too weak for the centering.\n"
                f"What to try, most likely first:\n"
                f"  1. Sharpen the teacher: lower --teacher_temp (now {tt}; the reference recommends 0.04 and "
                f"calls values above 0.07 unstable) and/or --warmup_teacher_temp (now {wtt}); a longer "
                f"--warmup_teacher_temp_epochs (now {wte}, paper 30) keeps the teacher sharp while "
                f"training settles.\n"
                f"  2. Lower the learning rate --lr (the rate per 256 images, now {base_lr}; "
                f"current scheduled lr {lr}; reference 0.0005, scaled by total batch / 256 with a "
                f"10-epoch warm-up): a too-large step early on flattens the head's output.\n"
                f"  3. Centre momentum m (DINOLoss center_momentum, now {m}; reference 0.9) is not the lever "
                f"here: centering at any m pushes towards uniform; keep 0.9 and strengthen the sharpening.\n"
                f"  4. Batch size (now {bs} in total = {bs_gpu} per GPU x {ws} ranks{accum}): with a "
                f"small total batch raise --momentum_teacher (now {mt}; reference: 0.9995 for batch 256) so "
                f"the teacher averages over more steps.")
        else:
            text = (
                f"DINO collapse warning: ONE-DIMENSION collapse (paper Section 5.3) - a single output "
                f"dimension dominates the teacher for every image (mean max probability "
                f"{float(stats.get('teacher_max_prob', float('nan'))):.3f}), so all images get the same "
                f"pseudo-label and the features carry no information. {numbers}{kl_note}\n"
                f"Why: sharpening pushes the teacher towards one dimension and only centering (subtracting "
                f"the running mean c of the teacher outputs, centre norm now "
                f"{float(stats.get('center_norm', float('nan'))):.3g}) counteracts it; here centering is "
                f"not keeping up with the sharpening.\n"
                f"What to try, most likely first:\n"
                f"  1. Make sure the centre follows the teacher: centre momentum m (DINOLoss center_momentum, "
                f"now {m}; reference 0.9). "
                f"A value close to 1 makes the centre lag so a dimension takes over before it is "
                f"subtracted; the centre must be the mean over ALL ranks' and micro-batches' teacher "
                f"outputs (a centre that never moves - norm stuck near 0 - means the update is not running).\n"
                f"  2. Soften the teacher slightly: {soften}.\n"
                f"  3. Lower the learning rate --lr (the rate per 256 images, now {base_lr}; "
                f"current scheduled lr {lr}; reference 0.0005, scaled by total batch / 256 with a "
                f"10-epoch warm-up); for ViT-B keep --norm_last_layer true "
                f"(now {_fmt(context, 'norm_last_layer')}), which the reference needs for stability.\n"
                f"  4. Batch size (now {bs} in total = {bs_gpu} per GPU x {ws} ranks{accum}): the "
                f"centre is a batch mean, so a tiny batch gives a noisy centre; use a larger total batch "
                f"(raise --batch_size_per_gpu; --grad_accum_steps makes it fit in memory) or raise "
                f"--momentum_teacher (now {mt}).")
        if "checkpoint" in context:
            text += f"\nLast checkpoint: {context['checkpoint']}"
        return text
