"""What `dino-fast train --method dinov2` builds in place of the DINO path's
pieces (dino_fast/train/methods.py picks them): the networks (network.py),
the objective with its Gram teacher (objective.py, gram.py), DINOv2's
parameter groups and schedules (param_groups.py), the step (step.py), and a
second collapse monitor for the iBOT head."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from dino_fast.runtime.health import CollapseMonitor

from .network import GramTeacher, build_dinov2_pair
from .objective import DINOv2Objective
from .param_groups import build_schedules, get_params_groups
from .step import dinov2_train_step

log = logging.getLogger(__name__)

__all__ = ["build_pair", "build_loss", "params_groups", "build_schedules", "train_step", "ibot_monitor",
           "ibot_record"]

build_pair = build_dinov2_pair
train_step = dinov2_train_step


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_loss(cfg, device: torch.device) -> DINOv2Objective:
    """The objective on `device`; with --gram_loss_weight > 0 also the Gram teacher, sharded like the
    teacher (its weights are copied from the EMA teacher when it is first used)."""
    obj = DINOv2Objective(cfg, impl=cfg.loss_impl).to(device)
    if cfg.gram_loss_weight > 0:
        from dino_fast.train.build import build_backbone, mixed_precision, shard

        from .gram import GramAnchor
        world = _world()
        use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and world > 1)
        import dataclasses
        net = GramTeacher(build_backbone(dataclasses.replace(cfg, mask_token=True), student=False)).to(device)
        if use_fsdp:
            policy, _, _ = mixed_precision(cfg, device, use_fsdp)
            net = shard(net, world, device, policy, teacher=True)
        obj.gram = GramAnchor(net, cfg)
        log.info("Gram anchoring: weight %g, teacher at %d px, first copy at iteration %d, refresh every %d",
                 cfg.gram_loss_weight, obj.gram.size, cfg.gram_it_first_update, cfg.gram_update_frequency)
    return obj


def params_groups(cfg, student) -> list[dict]:
    return get_params_groups(student, cfg.layerwise_decay, cfg.patch_embed_lr_mult)


class IBOTCollapseMonitor(CollapseMonitor):
    """The collapse monitor on the iBOT head's teacher entropy (its K), its warnings named so."""

    def message(self, mode, stats, epoch, context) -> str:
        return "iBOT head (masked patch tokens): " + super().message(mode, stats, epoch, context)


def ibot_monitor(cfg) -> IBOTCollapseMonitor:
    k = cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim
    return IBOTCollapseMonitor(k, patience=cfg.collapse_patience,
                               warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)


def ibot_record(rec: dict) -> dict:
    """A logging record seen from the iBOT head: its ibot_* stats under the DINO names."""
    out = {k: v for k, v in rec.items() if not k.startswith(("teacher_", "student_"))}
    for k in ("teacher_entropy", "teacher_max_prob", "student_entropy"):
        if f"ibot_{k}" in rec:
            out[k] = rec[f"ibot_{k}"]
    return out
