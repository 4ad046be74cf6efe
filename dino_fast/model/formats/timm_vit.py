"""timm's VisionTransformer layout: the DINO models (`vit_*_patch{8,16}_224.dino`) and DINOv2's
(`vit_*_patch14_dinov2`, `vit_*_patch14_reg4_dinov2`).

Same names as dino-fast's except:
- `reg_token` (1, n, D) for the registers; DINOv2's reg4 models are built with no_embed_class:
  `pos_embed` (1, N, D) covers the patches only and the CLS position is folded into `cls_token`
  (timm's own DINOv2 converter does cls_token + pos_embed[:, 0]). Read back with a zero CLS
  position, which gives the same tokens; a pos_embed with register entries is folded into the
  registers the same way;
- the packed SwiGLU of ViT-g is `mlp.fc1` (2H, D) / `mlp.fc2` (timm's GluMlp) for DINOv2's `w12`/`w3`;
- no mask token; `head.*` is a classifier (dropped); `fc_norm`, `norm_pre`, `q_norm`/`k_norm`
  and attention pooling have no counterpart here.
"""
from __future__ import annotations

import math

import torch

from dino_fast.model.formats.common import CheckpointError, packed_swiglu, rename_mlp

UNSUPPORTED = ("fc_norm.", "norm_pre.", "q_norm", "k_norm", "attn_pool.")


def matches(sd: dict) -> bool:
    return "pos_embed" in sd and ("reg_token" in sd or packed_swiglu(sd))


def _is_square(n: int) -> bool:
    return n > 0 and int(round(math.sqrt(n))) ** 2 == n


def to_internal(sd: dict, path: str = "checkpoint") -> tuple[dict, dict]:
    bad = sorted(k for k in sd if any(t in k for t in UNSUPPORTED))
    if bad:
        raise CheckpointError(f"{path}: timm layers dino-fast's ViT does not have ({bad[:4]}); only token-pool "
                              "ViTs (timm vit_*_dino, vit_*_dinov2 with num_classes=0 or a linear head) convert")
    out = {k: v for k, v in sd.items() if not k.startswith("head.")}
    hints = {"layout": "timm"}
    if packed_swiglu(out):
        out = rename_mlp(out, {"fc1": "w12", "fc2": "w3"})
    if "reg_token" in out:
        reg = out.pop("reg_token")                      # (1, n, D)
        pos = out["pos_embed"]                          # (1, P, D)
        n = reg.shape[1]
        if _is_square(pos.shape[1]):                    # no_embed_class: patches only
            cls_pos = torch.zeros_like(pos[:, :1])
        elif _is_square(pos.shape[1] - 1 - n):          # CLS and register positions first
            cls_pos, reg = pos[:, :1], reg + pos[:, 1:1 + n]
            pos = pos[:, 1 + n:]
        else:
            raise CheckpointError(f"{path}: pos_embed with {pos.shape[1]} entries fits neither the patches "
                                  f"of a square grid nor 1 + {n} prefix tokens + a square grid")
        out["register_tokens"] = reg
        out["pos_embed"] = torch.cat((cls_pos, pos), dim=1)
        hints["pos_interp"] = "antialias"
    return out, hints


def from_internal(sd: dict, cfg) -> dict:
    """timm VisionTransformer state dict; with registers, in timm's DINOv2 reg4 form
    (no_embed_class: CLS position folded into cls_token)."""
    if cfg.pos_embed != "learned" or cfg.untie_global_and_local_cls_norm:
        raise CheckpointError(f"{cfg.name}: RoPE / an untied local CLS norm have no timm VisionTransformer "
                              "layout (RoPE models export to timm's Eva)")
    if cfg.ffn_layer not in ("mlp", "swiglufused"):
        raise CheckpointError(f"{cfg.name}: timm's DINOv2 ViT has no {cfg.ffn_layer} layout; use safetensors")
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    if cfg.ffn_layer == "swiglufused":
        out = rename_mlp(out, {"w12": "fc1", "w3": "fc2"})
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:].contiguous()
    return out
