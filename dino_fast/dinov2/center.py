"""The EMA centre of DINOv2's softmax centring, updated lazily.

`update_center(teacher_output)` takes this rank's batch sum and starts its
all-reduce (asynchronous); the next `softmax_center_teacher` waits on it (on
the device stream with NCCL: no host sync) and applies

    c <- m * c + (1 - m) * all_reduce(sum) / (len(teacher_output) * world_size)

exactly as DINOv2's `reduce_center_update` / `apply_center_update`. The sum is
taken in fp32 (DINOv2 sums in the teacher's dtype; the result differs by that
dtype's rounding of the batch mean).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class LazyCenter:
    """Mixin of DINOLoss and iBOTPatchLoss: the `center` buffer and its lazy update.
    Subclasses set `center_momentum` and `process_group` and define `_batch_sum`."""

    center: torch.Tensor

    def _init_center(self, shape: tuple[int, ...]) -> None:
        self.register_buffer("center", torch.zeros(shape))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_output = None
        self.async_batch_center = None

    def init_weights(self) -> None:
        """DINOv3's name for zeroing the centre."""
        self.center.zero_()

    def _batch_sum(self, teacher_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: torch.Tensor) -> None:
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = self._batch_sum(teacher_output)
        if distributed(self.process_group):
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True, group=self.process_group)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self.updated is False:
            world_size = dist.get_world_size(self.process_group) if distributed(self.process_group) else 1
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
                self.reduce_handle = None
            batch_center = self.async_batch_center / (self.len_teacher_output * world_size)
            # a new tensor, as DINOv2: a backward still holding the old one is unaffected
            self.center = (self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
                           ).to(self.center.dtype)
            self.updated = True
