"""Backbone state-dict layouts dino-fast reads and writes, one module per source.

dino-fast's own layout ("internal") uses the official DINOv2 parameter names (`cls_token`,
`pos_embed`, `register_tokens`, `mask_token`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1/fc2 | mlp.w12/w3 | mlp.w1/w2/w3, ls2.gamma}`, `norm`) and DINOv3's for what only
DINOv3 has (`rope_embed.periods`, `local_cls_norm`); the reference DINO layout is its subset.

- dinov2:   the official DINOv2 backbones (hub `dinov2_vit*14[_reg]` weights): the internal names,
            `mask_token` always present, blocks chunked in training checkpoints (`blocks.0.5.`).
- dinov3:   the official DINOv3 ViTs: `storage_tokens`, `attn.qkv.bias_mask` (masked k bias).
- timm_vit: timm's VisionTransformer (`vit_*_patch16_224.dino`, `vit_*_patch14[_reg4]_dinov2`):
            `reg_token` with a position embedding without the CLS / register entries
            (no_embed_class), the packed SwiGLU of ViT-g as `mlp.fc1/fc2`, no mask token.
- timm_eva: timm's Eva for DINOv3 (`vit_*_patch16_dinov3[_qkvb]`): `reg_token`, `gamma_1/2`,
            `attn.q_bias/v_bias` (k bias fixed at 0), SwiGLU as `mlp.fc1_g/fc1_x/fc2`, RoPE buffers
            not saved (periods from rope_temperature=100).
`detect(sd)` names the layout; `to_internal(sd)` returns (internal state dict, config hints);
`from_internal(sd, cfg, layout)` writes one back.
"""
from __future__ import annotations

from dino_fast.model.formats import dinov2, dinov3, timm_eva, timm_vit
from dino_fast.model.formats.common import unchunk_blocks

LAYOUT_MODULES = {"dinov3": dinov3, "timm_eva": timm_eva, "timm_vit": timm_vit, "dinov2": dinov2}


def detect(sd: dict) -> str:
    """The layout of a backbone state dict (prefixes already stripped)."""
    for name in ("dinov3", "timm_eva", "timm_vit", "dinov2"):
        if LAYOUT_MODULES[name].matches(sd):
            return name
    return "internal"


def to_internal(sd: dict, path: str = "checkpoint") -> tuple[dict, dict]:
    """(state dict in dino-fast's layout, BackboneConfig hints) of any supported layout."""
    sd = unchunk_blocks(sd)
    name = detect(sd)
    if name == "internal":
        return sd, {}
    return LAYOUT_MODULES[name].to_internal(sd, path)
