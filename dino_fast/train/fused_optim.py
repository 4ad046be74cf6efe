"""Fused optimizer (`--fused_optimizer`): torch's fused AdamW, one kernel per parameter group and
dtype instead of the multi-tensor (foreach) launches, over dino-fast's parameter
groups as they are (no weight decay on biases and norms; per-group `lr_multiplier` /
`wd_multiplier` for layer-wise decay, applied by Schedules.set_optimizer).

The last-layer freeze drops those gradients (p.grad = None): the fused kernels skip parameters
without a gradient, exactly as the foreach path does. The schedules write Python floats into
the groups (no device read); a group whose lr is a tensor (capturable / compiled optimizers) is
filled in place with `fill_`, which enqueues a kernel and does not synchronise.
Devices without fused kernels (torch.optim's list) fall back to foreach, with a warning.
Fused SGD is not offered: with momentum it fails on a parameter whose first gradient comes after
the other parameters' (the head's last layer, frozen during the first epoch).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def fused_supported(groups: list[dict]) -> bool:
    """All parameters are floating point on a device with torch's fused optimizer kernels."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
    devices = set(_get_fused_kernels_supported_devices())
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def build_fused(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW with fused=True; foreach where the device has no fused kernel."""
    if name != "adamw":
        raise ValueError(f"--fused_optimizer is for adamw, not {name!r}: use --optimizer adamw or "
                         "--fused_optimizer false")
    fused = fused_supported(groups)
    if not fused:
        devices = sorted({p.device.type for g in groups for p in g["params"]})
        log.warning("--fused_optimizer: no fused %s kernel for devices %s; using foreach", name, devices)
    return torch.optim.AdamW(groups, **(dict(fused=True) if fused else {}))


def set_group_value(group: dict, key: str, value: float) -> None:
    """group[key] = value; in place (fill_, no sync) when the group holds a tensor there."""
    old = group.get(key)
    if isinstance(old, torch.Tensor):
        old.fill_(value)
    else:
        group[key] = value
