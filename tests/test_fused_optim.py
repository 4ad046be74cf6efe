"""--fused_optimizer: torch's fused AdamW over dino-fast's parameter groups gives the step of
the foreach optimizer (losses, gradients, student, teacher after 2 steps, fp32, with the last
layer frozen in the first step), and the schedules reach every group (lr / wd multipliers of
layer-wise decay, a tensor lr filled in place) without reading anything from the device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dino_fast.train.config import ConfigError
from dino_fast.train.fused_optim import fused_supported
from dino_fast.train.optim import Schedules, build_optimizer
from tests._step_options import batches, compare, make_state, run_steps

CPU_FUSED = fused_supported([{"params": [torch.nn.Parameter(torch.zeros(2))]}])


@pytest.mark.skipif(not CPU_FUSED, reason="this torch build has no fused CPU optimizer kernels")
def test_fused_adamw_step_equals_foreach():
    torch.set_num_threads(1)
    # no qkv bias: the k third of it has an exactly-zero gradient in theory (softmax ignores it), and
    # AdamW turns the round-off there into lr-sized steps of either sign
    over = dict(optimizer="adamw", lr=0.1, freeze_last_layer=1, qkv_bias=False)
    plain, fused = make_state(**over), make_state(fused_optimizer=True, **over)
    assert fused.optimizer.defaults["fused"] is True and not plain.optimizer.defaults.get("fused")
    start = {k: v.clone() for k, v in plain.student.state_dict().items()}
    data = batches()
    # epoch 0: the last layer is frozen (its gradients dropped), then epoch 1: it trains
    lp = [float(v) for v in (run_steps(plain, data[:1], epoch=0) + run_steps(plain, data[1:], epoch=1))]
    lf = [float(v) for v in (run_steps(fused, data[:1], epoch=0) + run_steps(fused, data[1:], epoch=1))]
    compare(plain, fused, lp, lf, rtol=1e-5, atol=2e-6)
    moved = max((plain.student.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4


def test_schedules_reach_every_group_with_multipliers():
    p = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    groups = [{"params": [p[0]], "lr_multiplier": 0.5, "wd_multiplier": 1.0},
              {"params": [p[1]], "lr_multiplier": 0.25, "wd_multiplier": 0.0},
              {"params": [p[2]], "lr_multiplier": 1.0, "wd_multiplier": 1.0, "lr": torch.tensor(0.0)}]
    opt = torch.optim.AdamW(groups)
    lr_tensor = opt.param_groups[2]["lr"]
    sched = Schedules(lr=np.array([0.1, 0.2]), wd=np.array([0.04, 0.05]), momentum=np.array([0.9, 0.9]),
                      niter_per_ep=2)
    sched.set_optimizer(opt, 1)
    assert [g["lr"] if not torch.is_tensor(g["lr"]) else float(g["lr"]) for g in opt.param_groups] == \
        pytest.approx([0.1, 0.05, 0.2])
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.05, 0.0, 0.05])
    assert opt.param_groups[2]["lr"] is lr_tensor          # filled in place, no new tensor


def test_reference_groups_unchanged():
    """Without multipliers: lr on every group, weight decay on the first only (the reference)."""
    p = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    opt = build_optimizer("adamw", [{"params": [p[0]]}, {"params": [p[1]], "weight_decay": 0.0}], fused=CPU_FUSED)
    Schedules(np.array([0.3]), np.array([0.07]), np.array([0.9]), 1).set_optimizer(opt, 0)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.3, 0.07), (0.3, 0.0)]


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_fused_is_for_adamw_only(optimizer):
    from dino_fast.train.presets import resolve
    with pytest.raises(ConfigError, match=f"--fused_optimizer is for adamw, not --optimizer {optimizer}"):
        resolve("demo", {"optimizer": optimizer, "fused_optimizer": True})
