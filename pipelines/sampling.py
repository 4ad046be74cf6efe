"""Which samples each rank reads in an epoch, and each sample's random seed.

One permutation per epoch (seeded by `seed` and `epoch`, identical on every
rank), split round-robin over ranks, so the ranks read disjoint parts that
together cover the dataset once. With `drop_last` the tail that does not
divide evenly over the ranks is left out (a different tail every epoch) so
every rank runs the same number of steps.

Per-sample seeds depend only on (seed, epoch, dataset index): the same image
gets the same crops in an epoch regardless of rank count, worker count or
backend scheduling.
"""
from __future__ import annotations

import numpy as np
import torch


def epoch_indices(n: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True, drop_last: bool = True) -> np.ndarray:
    """Dataset indices rank `rank` reads in `epoch`, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n, generator=g).numpy()
    else:
        order = np.arange(n)
    if drop_last:
        order = order[: (n // world_size) * world_size]
    return order[rank::world_size].astype(np.int64)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def num_batches(n_rank: int, batch_size: int, drop_last: bool) -> int:
    return n_rank // batch_size if drop_last else -(-n_rank // batch_size)
