"""Optimizer pieces, as the reference `utils.py` defines them: parameter
groups (no weight decay on biases and norms), per-tensor gradient clipping,
freezing the last layer, LARS, and the precomputed schedules.

Differences from the reference are only in how, not what: the per-tensor
norms are computed in one multi-tensor call and applied without reading them
on the host (the reference calls `.item()` per tensor), and under FSDP2 the
squared norms of the local shards are summed over ranks in one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dino_fast.schedules import cosine_scheduler


def get_params_groups(model: nn.Module) -> list[dict]:
    """[regularized, not regularized (biases and 1-d params, weight_decay 0)], as the reference."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def grad_norms(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each parameter's full gradient, (n,) fp32 on device, no host sync.
    Sharded (DTensor) gradients: local squared norms summed over the shard group."""
    grads = [_local(p.grad) for p in params]
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]) if grads else torch.zeros(0)
    sharded = [hasattr(p.grad, "device_mesh") for p in params]
    if any(sharded):
        sq = norms.square()
        mesh = next(p.grad.device_mesh for p, s in zip(params, sharded) if s)
        dist.all_reduce(sq, group=mesh.get_group())
        norms = sq.sqrt()
    return norms


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """The reference clip_gradients: each gradient tensor scaled by clip / (norm + 1e-6) when
    that is < 1 (multiplying by exactly 1.0 otherwise). Returns the norms as a device tensor."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(0)
    norms = grad_norms(params)  # (n,)
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    grads = [_local(p.grad) for p in params]
    torch._foreach_mul_(grads, list(coef.to(grads[0].dtype).unbind()))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's last layer during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class LARS(torch.optim.Optimizer):
    """LARS as in the reference (from Barlow Twins): weight decay and the trust ratio
    eta * ||p|| / ||update|| on parameters with more than one dimension, heavy-ball momentum."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def build_optimizer(name: str, groups: list[dict], fused: bool = False) -> torch.optim.Optimizer:
    """adamw | sgd (momentum 0.9) | lars; lr and weight decay are set every step from the schedules.
    fused: torch's fused AdamW kernel (fused_optim.py) where the parameters' device has it."""
    if fused:
        from .fused_optim import build_fused
        return build_fused(name, groups)
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}: use adamw, sgd or lars")


@dataclass
class Schedules:
    """Per-iteration values, precomputed exactly as the reference (len = epochs * niter_per_ep)."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    niter_per_ep: int

    def set_optimizer(self, optimizer: torch.optim.Optimizer, it: int) -> None:
        """lr on every group, weight decay on the first (regularized) group only; groups with
        `lr_multiplier` / `wd_multiplier` keys (layer-wise decay, DINOv2) get the scheduled value
        times their multiplier, weight decay then on every group. Values come from the host
        arrays; a tensor lr (fused / capturable optimizers) is filled in place: no host sync."""
        from .fused_optim import set_group_value
        lr, wd = float(self.lr[it]), float(self.wd[it])
        per_group_wd = any("wd_multiplier" in g for g in optimizer.param_groups)
        for i, group in enumerate(optimizer.param_groups):
            set_group_value(group, "lr", lr * group.get("lr_multiplier", 1.0))
            if per_group_wd:
                set_group_value(group, "weight_decay", wd * group.get("wd_multiplier", 1.0))
            elif i == 0:
                set_group_value(group, "weight_decay", wd)


def build_schedules(cfg, niter_per_ep: int, world_size: int) -> Schedules:
    """lr: linear scaling rule lr * batch_total / 256, linear warm-up then cosine to min_lr;
    weight decay: cosine weight_decay -> weight_decay_end; teacher momentum: cosine -> 1."""
    batch_total = cfg.batch_size_per_gpu * world_size
    lr = cosine_scheduler(cfg.lr * batch_total / 256.0, cfg.min_lr, cfg.epochs, niter_per_ep,
                          warmup_epochs=cfg.warmup_epochs)
    wd = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep)
    momentum = cosine_scheduler(cfg.momentum_teacher, 1, cfg.epochs, niter_per_ep)
    return Schedules(lr=lr, wd=wd, momentum=momentum, niter_per_ep=niter_per_ep)
