"""timm's Eva layout for the DINOv3 ViTs (`vit_*_patch16_dinov3`, `*_dinov3_qkvb`).

timm -> dino-fast: `reg_token` -> register_tokens; `blocks.N.gamma_1/2` -> ls1/ls2.gamma;
`attn.q_bias` + `attn.v_bias` (the k bias is a zero buffer) -> qkv.bias = [q, 0, v] with the k
third masked; unfused `attn.q_proj/k_proj/v_proj` -> qkv; SwiGLU `mlp.fc1_g` (gate) / `fc1_x`
(value) / `fc2` -> w1 / w2 / w3, a packed `mlp.fc1` (2H) -> w12; `head.*` dropped. RoPE: no
position embedding, no saved buffers; DINOv3's periods from rope_temperature (100 in every
timm DINOv3 model), LayerNorm eps 1e-5. timm's DINOv3 models pool by average by default:
their CLS feature is `forward_features(x)[:, 0]` (or global_pool="token").
"""
from __future__ import annotations

import torch

from dino_fast.model.formats.common import CheckpointError, packed_swiglu, rename_mlp

UNSUPPORTED = ("fc_norm.", "norm_pre.", "q_norm", "k_norm", "attn.norm.", "mlp.norm.", "attn_pool.", "attn.gate.")


def matches(sd: dict) -> bool:
    return "pos_embed" not in sd and "rope_embed.periods" not in sd and (
        "reg_token" in sd or "blocks.0.gamma_1" in sd or "blocks.0.attn.q_bias" in sd
        or "blocks.0.mlp.fc1_g.weight" in sd or "blocks.0.attn.q_proj.weight" in sd)


def to_internal(sd: dict, path: str = "checkpoint") -> tuple[dict, dict]:
    bad = sorted(k for k in sd if any(t in k for t in UNSUPPORTED))
    if bad:
        raise CheckpointError(f"{path}: timm Eva layers the DINOv3 ViT does not have ({bad[:4]}); only the "
                              "timm vit_*_dinov3 models convert")
    out, masked = {}, False
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        if k == "reg_token":
            k = "register_tokens"
        k = k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[k] = v
    for i in sorted({k.split(".")[1] for k in out if k.startswith("blocks.")}, key=int):
        a = f"blocks.{i}.attn."
        if a + "q_proj.weight" in out:
            out[a + "qkv.weight"] = torch.cat([out.pop(a + f"{n}_proj.weight") for n in "qkv"])
            if a + "q_proj.bias" in out:
                q, v = out.pop(a + "q_proj.bias"), out.pop(a + "v_proj.bias")
                out[a + "q_bias"], out[a + "v_bias"] = q, v
        if a + "q_bias" in out:
            q, v = out.pop(a + "q_bias"), out.pop(a + "v_bias")
            out[a + "qkv.bias"] = torch.cat((q, torch.zeros_like(q), v))
            masked = True
    if "blocks.0.mlp.fc1_g.weight" in out:
        out = rename_mlp(out, {"fc1_g": "w1", "fc1_x": "w2", "fc2": "w3"})
    elif packed_swiglu(out):
        out = rename_mlp(out, {"fc1": "w12", "fc2": "w3"})
    hints = {"layout": "timm", "pos_embed": "rope", "norm_eps": 1e-5, "mask_k_bias": masked,
             "rope_base": 100.0, "rope_min_period": None, "rope_max_period": None}
    return out, hints


def from_internal(sd: dict, cfg) -> dict:
    if cfg.pos_embed != "rope":
        raise CheckpointError(f"{cfg.name}: a learned pos_embed is timm's VisionTransformer layout, not Eva")
    if cfg.rope_base is None:
        raise CheckpointError(f"{cfg.name}: timm's DINOv3 RoPE takes a base (rope_temperature), "
                              "this model uses min/max periods; export it as dinov3 or safetensors")
    out = {}
    for k, v in sd.items():
        if k in ("mask_token", "rope_embed.periods") or k.startswith("local_cls_norm."):
            continue
        if k == "register_tokens":
            k = "reg_token"
        k = k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        if k.endswith("attn.qkv.bias"):
            q, kb, vb = v.chunk(3)
            if not cfg.mask_k_bias and kb.abs().max() > 0:
                raise CheckpointError(f"{cfg.name}: {k} has a non-zero k bias, timm's Eva holds none")
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, vb
            continue
        out[k] = v
    if cfg.ffn_layer == "swiglufused":
        out = rename_mlp(out, {"w12": "fc1", "w3": "fc2"})
    elif cfg.ffn_layer != "mlp":
        out = rename_mlp(out, {"w1": "fc1_g", "w2": "fc1_x", "w3": "fc2"})
    return out
