"""Build the student, the teacher and the loss from a config, and shard them.

Student and teacher are `MultiCropWrapper(vit, DINOHead)` as in the reference;
the teacher starts as a copy of the student and never gets gradients. With
FSDP2 both are sharded the same way (`fully_shard` on every block, then on the
root) so each rank's teacher shard lines up with its student shard and the EMA
runs on local shards without communication. Mixed precision is one policy for
one device and for FSDP2 (precision.py): bf16 autocast compute, fp32 parameters,
fp32 gradient reduction, fp32 master weights (on CUDA, or on the CPU with
cpu_autocast; else fp32).

Backbones: the config's ViT (with its DINOv2 / DINOv3 options) or convnet, or with --init_from
the architecture and weights of that file (init_from.py). Convnets run the reference's
per-resolution loop, and their BatchNorm layers become SyncBatchNorm with more than one process.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def build_backbone(cfg, student: bool, init=None) -> nn.Module:
    """The backbone of `cfg`, or of the --init_from file (`init`: init_from.read_init) with its
    weights. Student only: drop path (as the reference), RoPE coordinate augmentations (DINOv3's
    teacher runs in eval mode, without them), activation checkpointing."""
    from dino_fast.model.backbone_config import from_train
    bcfg = init.config if init is not None else from_train(cfg)
    kw = {}
    if student:
        kw["drop_path_rate"] = cfg.drop_path_rate  # stochastic depth on the student only, as the reference
    if bcfg.kind == "vit":
        kw["activation_checkpointing"] = cfg.activation_checkpointing if student else False
        kw["efficient_drop_path"] = getattr(cfg, "efficient_drop_path", False) and student
        if student and bcfg.pos_embed == "rope":
            kw.update(rope_shift_coords=cfg.rope_shift_coords or None,
                      rope_jitter_coords=cfg.rope_jitter_coords or None,
                      rope_rescale_coords=cfg.rope_rescale_coords or None)
    backbone = bcfg.build(cfg.attention, **kw)
    if init is not None:
        from .init_from import load_backbone
        load_backbone(backbone, init, cfg.global_size)
    return backbone


def build_network(cfg, student: bool = True, init=None) -> nn.Module:
    """MultiCropWrapper(backbone, DINOHead) on the CPU in fp32 (the teacher: no drop path, and the
    reference builds its head with norm_last_layer left at True)."""
    from dino_fast.model import DINOHead, MultiCropWrapper
    backbone = build_backbone(cfg, student, init)
    head = DINOHead(backbone.embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                    norm_last_layer=cfg.norm_last_layer if student else True,
                    hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    if init is not None:
        from .init_from import load_head
        load_head(head, init)
    return MultiCropWrapper(backbone, head)


def build_pair(cfg, network=None) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) on the CPU in fp32, teacher = student's weights, no grads.
    `network(cfg, student, init)` builds one of them (default build_network: the DINO
    method's; dino_fast.dinov2.network passes its own)."""
    network = network or build_network
    init = None
    if getattr(cfg, "init_from", ""):
        from .init_from import read_init
        init = read_init(cfg.init_from, cfg.init_from_key)
    student, teacher = network(cfg, True, init), network(cfg, False, init)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def build_loss(cfg, device: torch.device) -> nn.Module:
    from dino_fast.losses.dino_loss import DINOLoss
    return DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                    cfg.warmup_teacher_temp_epochs, cfg.epochs, impl=cfg.loss_impl).to(device)


def mixed_precision(cfg, device: torch.device, use_fsdp: bool):
    """(FSDP MixedPrecisionPolicy or None, autocast context factory, GradScaler or None): autocast
    on one device and under FSDP2 alike, fp32 parameters all-gathered (precision.py says why)."""
    from .precision import mixed_precision as plan
    return plan(cfg.precision, device, use_fsdp, getattr(cfg, "cpu_autocast", False))


def shard(model: nn.Module, world_size: int, device: torch.device, policy, teacher: bool = False) -> nn.Module:
    """FSDP2: fully_shard each transformer block, then the root.

    The teacher passes reshard_after_forward=True explicitly: FSDP2 otherwise keeps the
    root's parameters unsharded after forward (expecting a backward to follow), and the
    teacher has no backward, so its next forward would reuse the stale unsharded copy
    instead of the EMA-updated shards. torch honours it for the root only from 2.8, so the
    teacher's root is also resharded by a forward hook (reshard.py) on every version."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    kw = dict(mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    if teacher:
        kw["reshard_after_forward"] = True
    from dino_fast.model.convnet import fsdp_units
    for block in fsdp_units(model.backbone):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    if teacher:  # torch < 2.8 ignores reshard_after_forward on the root: reshard it explicitly
        from .reshard import reshard_root_after_forward
        reshard_root_after_forward(model)
    return model


def sync_batchnorm(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over all ranks, as the reference) with more than one
    process. SyncBatchNorm runs on GPUs only: CPU (gloo) runs keep per-rank statistics (warned)."""
    from dino_fast.model.convnet import has_batchnorms
    if world_size == 1 or not has_batchnorms(model):
        return model
    if device.type != "cuda":
        log.warning("batch norm statistics stay per process: SyncBatchNorm needs CUDA devices")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def prepare(cfg, student: nn.Module, teacher: nn.Module, device: torch.device, world_size: int,
            use_fsdp: bool):
    """Move to device, shard (FSDP2) or keep plain, compile; returns (student, teacher, autocast, scaler)."""
    policy, autocast, scaler = mixed_precision(cfg, device, use_fsdp)
    student, teacher = sync_batchnorm(student, world_size, device), sync_batchnorm(teacher, world_size, device)
    student, teacher = student.to(device), teacher.to(device)
    if use_fsdp:
        student = shard(student, world_size, device, policy)
        teacher = shard(teacher, world_size, device, policy, teacher=True)
    from .compile import apply_compile  # --compile blocks|model, --cuda_graph_teacher (inside the FSDP2 units)
    student, teacher = apply_compile(cfg, student, teacher, device)
    log.info("student/teacher %s: %s on %s, precision %s, compile %s", cfg.arch,
             "FSDP2 over %d ranks" % world_size if use_fsdp else "single device", device,
             cfg.precision if device.type == "cuda" else "fp32 (CPU)", cfg.compile or "off")
    return student, teacher, autocast, scaler
