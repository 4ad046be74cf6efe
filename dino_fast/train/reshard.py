"""The FSDP2 teacher's root parameters follow the EMA on every supported torch.

The teacher has no backward. FSDP2 keeps the root module's all-gathered
parameters after forward (a backward usually follows) unless the root is built
with reshard_after_forward=True, and torch honours that for the root only from
2.8. On 2.6 and 2.7 the root's gathered copy (patch and position embeddings, CLS
token, final norm, the whole DINO head) would stay allocated, and every later
teacher forward would reuse it instead of all-gathering the EMA-updated shards.
A forward hook reshards the root explicitly after each forward (train step,
k-NN monitor, anything else), so the next forward gathers the current shards on
every version; where torch already resharded, `reshard()` does nothing.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.compiler.disable
def _reshard_hook(module: nn.Module, _args, _output) -> None:
    module.reshard()                 # FSDPModule.reshard: this module only (not recursive)


def reshard_root_after_forward(model: nn.Module):
    """Reshard `model` (an FSDP2 root, `fully_shard`-ed) after each of its forwards; returns
    the hook handle."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        raise TypeError(f"reshard_root_after_forward: {type(model).__name__} is not fully_shard-ed")
    return model.register_forward_hook(_reshard_hook)


__all__ = ["reshard_root_after_forward"]
