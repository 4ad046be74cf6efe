"""The official DINOv3 ViT layout (facebookresearch/dinov3 `DinoVisionTransformer`).

Differences from dino-fast's names: `storage_tokens` (= register_tokens); with qkv bias and
`mask_k_bias`, a `blocks.N.attn.qkv.bias_mask` buffer (1 on q and v, 0 on k) that multiplies the
bias in the forward. Shared: `rope_embed.periods` (persistent there too, bf16 in some releases),
`blocks.N.ls1.gamma`, `mlp.fc1/fc2` or `mlp.w1/w2/w3`, `mask_token`, `local_cls_norm` (7B).
`cls_norm` (untie_cls_and_patch_norms) is not supported: the released ViTs do not use it.
"""
from __future__ import annotations

import torch

from dino_fast.model.formats.common import CheckpointError


def matches(sd: dict) -> bool:
    return "storage_tokens" in sd or any(k.endswith("attn.qkv.bias_mask") for k in sd)


def to_internal(sd: dict, path: str = "checkpoint") -> tuple[dict, dict]:
    if any(k.startswith("cls_norm.") for k in sd):
        raise CheckpointError(f"{path}: a DINOv3 model with untie_cls_and_patch_norms (cls_norm.*) is not supported")
    out, masked = {}, False
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias_mask"):
            continue
        if k.endswith("attn.qkv.bias") and k + "_mask" in sd:
            v = v * sd[k + "_mask"].to(v.dtype)   # the k third is masked to 0 in DINOv3's forward
            masked = True
        out["register_tokens" if k == "storage_tokens" else k] = v
    if "pos_embed" in out:
        raise CheckpointError(f"{path}: DINOv3 storage tokens with a learned pos_embed is not a DINOv3 ViT")
    hints = {"layout": "dinov3", "pos_embed": "rope", "norm_eps": 1e-5, "mask_k_bias": masked,
             "mask_token": "mask_token" in out}
    return out, hints


def from_internal(sd: dict, cfg) -> dict:
    if cfg.pos_embed != "rope":
        raise CheckpointError(f"{cfg.name}: DINOv3 ViTs use RoPE, this model has a learned pos_embed; "
                              "export it as dinov2, timm or safetensors")
    if cfg.ffn_layer == "swiglufused":
        raise CheckpointError(f"{cfg.name}: DINOv3 has no packed SwiGLU (w12); export it as safetensors")
    out = {}
    for k, v in sd.items():
        out["storage_tokens" if k == "register_tokens" else k] = v
        if k.endswith("attn.qkv.bias") and cfg.mask_k_bias:
            d = v.shape[0] // 3
            mask = torch.ones_like(v)
            mask[d:2 * d] = 0
            out[k + "_mask"] = mask
    if "mask_token" not in out:
        out["mask_token"] = torch.zeros(1, cfg.embed_dim, dtype=out["cls_token"].dtype)
    return out
