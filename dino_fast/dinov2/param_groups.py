"""DINOv2's optimizer parameter groups and their schedules
(dinov2/utils/param_groups.py, dinov2/train/train.py `apply_optim_scheduler`).

Each trainable parameter of the student gets
  lr_multiplier = layerwise_decay ** (depth + 1 - layer_id)
      layer_id = 0 for the patch embedding, position embedding, CLS / register / mask
      tokens; i + 1 for block i; depth + 1 for everything else (final norm, heads),
      times patch_embed_lr_mult for the patch embedding;
  wd_multiplier = 0 for biases, norms and LayerScale gammas ("bias", "norm", "gamma"
      in the name, as DINOv2), else 1;
  is_last_layer = the heads' last layer (lr 0 while it is frozen);
and parameters with equal (lr_multiplier, wd_multiplier, is_last_layer) are fused into
one group (DINOv2's `fuse_params_groups`). The step then sets, per group,
  lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier,
  weight_decay = wd * wd_multiplier,
from the precomputed host arrays: plain Python floats, no device read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

_LAYER0 = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings and tokens of the backbone, i + 1 for `backbone.blocks.i.*`, depth + 1 else."""
    if not name.startswith("backbone."):
        return depth + 1
    rest = name[len("backbone."):]
    if rest.split(".")[0] in _LAYER0:
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def param_multipliers(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> dict:
    lr_mult = layerwise_decay ** (depth + 1 - layer_id(name, depth))
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
    return dict(lr_multiplier=lr_mult, wd_multiplier=wd_mult, is_last_layer="last_layer" in name)


def get_params_groups(model: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
                      ) -> list[dict]:
    """Fused groups of `model` (a DINOv2Network: backbone + heads), each a dict with params,
    lr_multiplier, wd_multiplier, is_last_layer (in first-appearance order)."""
    depth = len(model.backbone.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = param_multipliers(name, depth, layerwise_decay, patch_embed_lr_mult)
        key = (m["lr_multiplier"], m["wd_multiplier"], m["is_last_layer"])
        groups.setdefault(key, {"params": [], **m})["params"].append(p)
    log.info("dinov2 parameter groups: %d (layer-wise decay %g, patch-embedding lr x %g)", len(groups),
             layerwise_decay, patch_embed_lr_mult)
    return list(groups.values())


def linear_warmup_cosine_decay(start: float, peak: float, end: float, warmup_iterations: int,
                               total_iterations: int, cosine_iterations: int | None = None) -> np.ndarray:
    """DINOv3's schedule (dinov3/train/cosine_lr_scheduler.py): linear start -> peak, a half cosine
    peak -> end over cosine_iterations (default: the rest), then constant end."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine_iterations)) + 1) / 2 + end
    rest = total_iterations - cosine_iterations - warmup_iterations
    if rest < 0:
        raise ValueError(f"schedule: warm-up {warmup_iterations} + cosine {cosine_iterations} iterations exceed "
                         f"{total_iterations}")
    return np.concatenate([linear, cosine, np.full((rest,), end)])


@dataclass
class DINOv2Schedules:
    """Per-iteration host arrays (len = epochs * niter_per_ep), DINOv2's `build_schedulers`:
    lr (linear warm-up from 0, cosine to min_lr), wd (cosine), momentum (cosine to 1),
    teacher_temp (linear warm-up per iteration, then constant), last_layer_lr (lr, 0 while
    the last layer is frozen), gram_weight (the Gram anchoring weight)."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray
    gram_weight: np.ndarray
    niter_per_ep: int

    def set_optimizer(self, optimizer: torch.optim.Optimizer, it: int) -> None:
        """DINOv2's apply_optim_scheduler from the groups' multipliers (host floats only)."""
        lr, wd, last = float(self.lr[it]), float(self.wd[it]), float(self.last_layer_lr[it])
        for group in optimizer.param_groups:
            group["lr"] = (last if group.get("is_last_layer", False) else lr) * group.get("lr_multiplier", 1.0)
            group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)


def build_schedules(cfg, niter_per_ep: int, world_size: int) -> DINOv2Schedules:
    from dino_fast.schedules import cosine_scheduler

    from .train_config import scaled_lr
    total = cfg.epochs * niter_per_ep
    lr = cosine_scheduler(scaled_lr(cfg, cfg.batch_size_per_gpu * world_size), cfg.min_lr, cfg.epochs,
                          niter_per_ep, warmup_epochs=cfg.warmup_epochs)
    wd = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep)
    momentum = cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, niter_per_ep)
    warm = cfg.warmup_teacher_temp_epochs * niter_per_ep
    teacher_temp = np.concatenate((np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm),
                                   np.full(total - warm, cfg.teacher_temp)))
    last_layer_lr = lr.copy()
    last_layer_lr[:cfg.freeze_last_layer * niter_per_ep] = 0.0
    w, wu, ramp = cfg.gram_loss_weight, cfg.gram_weight_warmup_epochs * niter_per_ep, \
        cfg.gram_weight_ramp_epochs * niter_per_ep
    if ramp:
        gram = linear_warmup_cosine_decay(0.0, 0.0, w, wu, total, ramp)
    else:
        gram = np.concatenate((np.zeros(min(wu, total)), np.full(total - min(wu, total), w)))
    return DINOv2Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, last_layer_lr=last_layer_lr,
                           gram_weight=gram, niter_per_ep=niter_per_ep)
