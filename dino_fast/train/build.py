"""Build the student, the teacher and the loss from a config, and shard them.

Student and teacher are `MultiCropWrapper(vit, DINOHead)` as in the reference;
the teacher starts as a copy of the student and never gets gradients. With
FSDP2 both are sharded the same way (`fully_shard` on every block, then on the
root) so each rank's teacher shard lines up with its student shard and the EMA
runs on local shards without communication. Mixed precision is one policy,
here: bf16 parameters for compute, fp32 gradient reduction, fp32 master
weights (only on CUDA; CPU runs fp32).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def build_backbone(cfg, student: bool) -> nn.Module:
    from dino_fast import model as models
    kw = dict(patch_size=cfg.patch_size, attention=cfg.attention,
              activation_checkpointing=cfg.activation_checkpointing and student)
    if student:
        kw["drop_path_rate"] = cfg.drop_path_rate  # stochastic depth on the student only, as the reference
    if cfg.depth:
        kw["depth"] = cfg.depth
    return getattr(models, cfg.arch)(**kw)


def build_network(cfg, student: bool = True) -> nn.Module:
    """MultiCropWrapper(ViT, DINOHead) on the CPU in fp32 (the teacher: no drop path, and the
    reference builds its head with norm_last_layer left at True)."""
    from dino_fast.model import DINOHead, MultiCropWrapper
    backbone = build_backbone(cfg, student)
    head = DINOHead(backbone.embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                    norm_last_layer=cfg.norm_last_layer if student else True,
                    hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    return MultiCropWrapper(backbone, head)


def build_pair(cfg) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) on the CPU in fp32, teacher = student's weights, no grads."""
    student, teacher = build_network(cfg, True), build_network(cfg, False)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def build_loss(cfg, device: torch.device) -> nn.Module:
    from dino_fast.losses.dino_loss import DINOLoss
    return DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                    cfg.warmup_teacher_temp_epochs, cfg.epochs, impl=cfg.loss_impl).to(device)


def mixed_precision(cfg, device: torch.device, use_fsdp: bool):
    """(FSDP MixedPrecisionPolicy or None, autocast context factory, GradScaler or None).
    bf16 under FSDP2 is the policy alone (it casts parameters and inputs); on one device, autocast."""
    cuda = device.type == "cuda"
    if not cuda or cfg.precision == "fp32":
        return None, contextlib.nullcontext, None
    if cfg.precision == "bf16":
        if use_fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            return policy, contextlib.nullcontext, None
        return None, (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    # fp16: autocast + dynamic loss scaling (the reference's use_fp16)
    return None, (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


def shard(model: nn.Module, world_size: int, device: torch.device, policy, teacher: bool = False) -> nn.Module:
    """FSDP2: fully_shard each transformer block, then the root.

    The teacher passes reshard_after_forward=True explicitly: FSDP2 otherwise keeps the
    root's parameters unsharded after forward (expecting a backward to follow), and the
    teacher has no backward, so its next forward would reuse the stale unsharded copy
    instead of the EMA-updated shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    kw = dict(mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    if teacher:
        kw["reshard_after_forward"] = True
    for block in model.backbone.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def prepare(cfg, student: nn.Module, teacher: nn.Module, device: torch.device, world_size: int,
            use_fsdp: bool):
    """Move to device, shard (FSDP2) or keep plain, compile; returns (student, teacher, autocast, scaler)."""
    policy, autocast, scaler = mixed_precision(cfg, device, use_fsdp)
    student, teacher = student.to(device), teacher.to(device)
    if use_fsdp:
        student = shard(student, world_size, device, policy)
        teacher = shard(teacher, world_size, device, policy, teacher=True)
    if cfg.compile:
        student.compile()
        teacher.compile()
    log.info("student/teacher %s: %s on %s, precision %s, %s", cfg.arch,
             "FSDP2 over %d ranks" % world_size if use_fsdp else "single device", device,
             cfg.precision if device.type == "cuda" else "fp32 (CPU)", "compiled" if cfg.compile else "eager")
    return student, teacher, autocast, scaler
