"""What the memory plan needs to know about a backbone, read from a built model (the meta
device is enough: no weights are touched).

ViTs: width, heads, prefix tokens (CLS + registers), the FFN's saved activations per token,
LayerScale, RoPE, parameter counts (total, trainable, one block). Convnets: the activation
bytes autograd saves per image at a given input size, counted by running the model on the meta
device under `torch.autograd.graph.saved_tensors_hooks` (fp32; no memory, no compute).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class BackboneShape:
    kind: str                  # "vit" | "convnet"
    arch: str
    embed_dim: int
    params: int                # backbone parameters
    params_trainable: int
    params_block: int          # one FSDP unit: a ViT block, a convnet's largest top-level stage
    units: int                 # ViT blocks (convnets: their FSDP units)
    patch_size: int = 0
    heads: int = 0
    prefix: int = 1            # CLS + registers per row
    ffn_saved: int = 0         # FFN activations saved per token, in units of width 1 (MLP 2*H, SwiGLU 4*H')
    layerscale: bool = False
    rope: bool = False
    rope_per_block: bool = False  # RoPE augmentations on: fresh tables in every block
    pos_embed_tokens: int = 0  # learned position embedding entries (0 with RoPE)


def backbone_shape(model: nn.Module) -> BackboneShape:
    from dino_fast.model.convnet import fsdp_units
    from dino_fast.model.ffn import Mlp
    model = getattr(model, "_orig_mod", model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    units = fsdp_units(model)
    block = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    if not hasattr(model, "blocks"):
        return BackboneShape("convnet", str(getattr(model, "arch", type(model).__name__)), int(model.embed_dim),
                             params, trainable, block, len(units))
    ffn = model.blocks[0].mlp
    ffn_saved = 2 * ffn.fc1.out_features if isinstance(ffn, Mlp) else 4 * ffn.w3.in_features
    rope = model.rope_embed
    augments = rope is not None and any(v is not None for v in (rope.shift_coords, rope.jitter_coords,
                                                                rope.rescale_coords))
    return BackboneShape("vit", str(getattr(model, "arch", "vit")), int(model.embed_dim), params, trainable, block,
                         len(model.blocks), int(model.patch_embed.patch_size), int(model.num_heads),
                         int(model.num_prefix_tokens), int(ffn_saved), model.blocks[0].ls1 is not None,
                         rope is not None, bool(augments),
                         0 if model.pos_embed is None else int(model.pos_embed.shape[1]))


@functools.lru_cache(maxsize=64)
def convnet_saved_bytes(arch: str, size: int) -> tuple[int, int]:
    """(bytes autograd saves for backward per image in train mode, the largest saved tensor's
    bytes per image) of convnet `arch` at size x size px, fp32, counted on the meta device: the
    slope between batches of 2 and 4 (batch norm's per-channel statistics do not grow with the
    batch, and train-mode batch norm needs more than one value per channel)."""
    from dino_fast.model.convnet import build_convnet
    with torch.device("meta"):
        model = build_convnet(arch)
    model.train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def count(b: int) -> tuple[int, int]:
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in params:
                seen[st._cdata] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.empty(b, 3, size, size, device="meta"))
        return sum(seen.values()), max(seen.values(), default=0)

    (s2, l2), (s4, l4) = count(2), count(4)
    return (s4 - s2) // 2, l4 // 4
