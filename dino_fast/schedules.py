"""Per-iteration schedules, precomputed as arrays exactly as the reference
(facebookresearch/dino utils.cosine_scheduler and DINOLoss's teacher
temperature schedule)."""
from __future__ import annotations

import numpy as np


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warm-up for `warmup_epochs`, then a half cosine from `base_value`
    to `final_value`; one value per iteration (epochs * niter_per_ep)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float,
                          warmup_teacher_temp_epochs: int, nepochs: int) -> np.ndarray:
    """One teacher temperature per epoch: linear warm-up, then constant."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


class MomentumSchedule:
    """Teacher EMA momentum per iteration: cosine from `momentum_teacher` to 1
    over all iterations (the reference's momentum_schedule)."""

    def __init__(self, momentum_teacher: float, epochs: int, niter_per_ep: int):
        self.values = cosine_scheduler(momentum_teacher, 1.0, epochs, niter_per_ep)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, it: int) -> float:
        return float(self.values[it])

    def as_tensor(self, device=None, dtype=None):
        """The whole schedule on `device` (float64 by default: the EMA forms
        1 - momentum from it in fp64, like the reference's Python float), so a
        step can index it without a host round trip."""
        import torch
        return torch.as_tensor(self.values, dtype=dtype or torch.float64, device=device)
