"""The official DINOv2 backbone layout (facebookresearch/dinov2 `DinoVisionTransformer`,
the hub weights `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`).

Its parameter names are dino-fast's own; what marks it is `mask_token` (always present there)
with a learned `pos_embed`. The hub models resize the embedding as the reference (+0.1 offset,
no antialias) without registers and to the exact size with antialias with registers.
Writing it back adds a zero `mask_token` when the model has none; RoPE models and the untied
local CLS norm have no DINOv2 counterpart.
"""
from __future__ import annotations

import torch

from dino_fast.model.formats.common import CheckpointError


def matches(sd: dict) -> bool:
    return "mask_token" in sd and "pos_embed" in sd


def to_internal(sd: dict, path: str = "checkpoint") -> tuple[dict, dict]:
    hints = {"layout": "dinov2", "pos_interp": "antialias" if "register_tokens" in sd else "reference"}
    return dict(sd), hints


def from_internal(sd: dict, cfg) -> dict:
    if cfg.pos_embed != "learned" or cfg.untie_global_and_local_cls_norm:
        raise CheckpointError(f"{cfg.name}: RoPE / an untied local CLS norm have no DINOv2 layout; "
                              "export it as dinov3, timm or safetensors")
    if cfg.ffn_layer not in ("mlp", "swiglufused"):
        raise CheckpointError(f"{cfg.name}: DINOv2 has no {cfg.ffn_layer} feed-forward layout (only mlp and "
                              "swiglufused); export it as dinov3 or safetensors")
    out = dict(sd)
    if "mask_token" not in out:
        out["mask_token"] = torch.zeros(1, cfg.embed_dim, dtype=out["cls_token"].dtype)
    return out
