"""The training method's pieces, picked once from --method: dino (this package:
build.py, optim.py, step.py) or dinov2 (dino_fast/dinov2/build.py). The loop
calls them by these names and is otherwise the same for both."""
from __future__ import annotations

from types import SimpleNamespace


def method_parts(cfg, dino) -> SimpleNamespace:
    """build_pair(cfg), build_loss(cfg, device), params_groups(cfg, student),
    build_schedules(cfg, niter_per_ep, world_size), train_step(st, crops, it, epoch),
    ibot_monitor(cfg) / ibot_record(rec) (dinov2: the iBOT head's collapse monitor; dino: None).
    `dino`: the module holding the DINO path's names (the loop passes itself; its names are looked
    up at call time, so tests that patch them there are honoured)."""
    if getattr(cfg, "method", "dino") == "dinov2":
        from dino_fast.dinov2 import build as v2
        return SimpleNamespace(build_pair=v2.build_pair, build_loss=v2.build_loss, params_groups=v2.params_groups,
                               build_schedules=v2.build_schedules, train_step=v2.train_step,
                               ibot_monitor=v2.ibot_monitor, ibot_record=v2.ibot_record)
    loop = dino
    return SimpleNamespace(build_pair=lambda cfg: loop.build_pair(cfg),
                           build_loss=lambda cfg, device: loop.build_loss(cfg, device),
                           params_groups=lambda cfg, student: loop.get_params_groups(student),
                           build_schedules=lambda cfg, n, world: loop.build_schedules(cfg, n, world),
                           train_step=lambda st, crops, it, epoch: loop.train_step(st, crops, it, epoch),
                           ibot_monitor=None, ibot_record=None)
