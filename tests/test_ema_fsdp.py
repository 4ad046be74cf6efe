"""Teacher EMA on FSDP2-sharded modules (2 gloo processes on CPU): the update
runs on the local shards with no collective, and the full teacher afterwards
equals the reference loop on unsharded copies."""
import copy

import pytest
import torch
import torch.nn as nn

from tests._dist import run_distributed


def _model() -> nn.Module:
    # odd sizes: dim-0 lengths 7, 13 (uneven split), 1 (rank 1 holds an empty shard)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 13), nn.GELU(),
                         nn.Linear(13, 1))


def _shard(module: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    for layer in module:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def _fsdp_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from dino_fast.kernels.ema import ema_update_, ema_update_reference_

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)                         # same weights on every rank
    student = _model()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    _shard(teacher, mesh)
    _shard(student, mesh)
    assert all(isinstance(p, DTensor) for p in teacher.parameters())
    assert any(p.to_local().numel() == 0 for p in teacher.parameters()) == (rank == 1)

    momenta = [0.996, torch.tensor(0.9), 0.5]
    for impl in ("triton", "foreach", "loop"):
        for m in momenta:
            with CommDebugMode() as comm:        # counts every DTensor collective
                ema_update_(list(teacher.parameters()), list(student.parameters()), m, impl=impl)
            assert comm.get_total_counts() == 0, comm.get_comm_counts()
            ema_update_reference_(list(ref_teacher.parameters()), list(ref_student.parameters()), m)
    # modules accepted as well
    ema_update_(teacher, student, 0.25, impl="triton")
    ema_update_reference_(ref_teacher, ref_student, 0.25)

    for (name, p), r in zip(teacher.named_parameters(), ref_teacher.parameters()):
        full = p.full_tensor()
        # foreach uses lerp (a different rounding): fp32 within a few ulps
        torch.testing.assert_close(full, r.detach(), rtol=1e-6, atol=1e-7, msg=name)

    # a sharded teacher with an unsharded student is refused, naming the index
    with pytest.raises(ValueError, match="index 0: teacher is a DTensor but student is a plain tensor"):
        ema_update_(teacher, _model(), 0.9)


def test_ema_on_fsdp2_sharded_modules():
    run_distributed(_fsdp_worker, world_size=2)
