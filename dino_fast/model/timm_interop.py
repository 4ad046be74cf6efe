"""Export a DINO backbone to timm (`vit_*_patch*_224.dino`) and back.

timm's VisionTransformer with global_pool="token" uses the reference's key
names one to one (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm); what differs is that a
timm model has a fixed input size, so exporting for another image size
resamples pos_embed with the reference's own interpolation (the timm model
then gives our features at that size), and timm-only parts (fc_norm, norm_pre,
register tokens, layer scale) have no reference counterpart.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_TIMM_ONLY = ("fc_norm.", "norm_pre.", "reg_token", ".ls1.", ".ls2.", "q_norm", "k_norm", "attn_pool.")
_DINO_TAGS = {(384, 16), (384, 8), (768, 16), (768, 8)}  # timm has .dino weights for these
_SIZE_NAMES = {192: "tiny", 384: "small", 768: "base"}


def timm_model_name(backbone: nn.Module) -> str:
    """timm architecture name matching `backbone`, e.g. 'vit_small_patch16_224.dino'."""
    d, p = backbone.embed_dim, backbone.patch_embed.patch_size
    if d not in _SIZE_NAMES:
        raise ValueError(f"no timm ViT name for embed_dim={d}: timm names exist for {sorted(_SIZE_NAMES)}")
    name = f"vit_{_SIZE_NAMES[d]}_patch{p}_224"
    return name + ".dino" if (d, p) in _DINO_TAGS else name


def to_timm_state_dict(backbone: nn.Module, img_size: int | None = None) -> dict[str, torch.Tensor]:
    """timm-loadable state dict of a dino_fast (or reference) ViT backbone.
    img_size: the timm model's input size if not the checkpoint's own (pos_embed
    is resampled exactly as the reference's interpolate_pos_encoding)."""
    backbone = getattr(backbone, "_orig_mod", backbone)
    sd = {k: v.detach().clone() for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    if img_size is not None:
        p = backbone.patch_embed.patch_size
        tokens = torch.zeros(1, 1 + (img_size // p) ** 2, backbone.embed_dim)
        with torch.no_grad():
            sd["pos_embed"] = backbone.interpolate_pos_encoding(tokens, img_size, img_size).detach().clone()
    return sd


def from_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference-named backbone state dict from a timm DINO ViT state dict.
    A classifier head (`head.*`) is dropped; timm-only layers are refused."""
    bad = sorted(k for k in state_dict if any(t in k for t in _TIMM_ONLY))
    if bad:
        raise ValueError(f"timm state dict has layers the DINO ViT does not have ({bad[:4]}...): "
                         f"only plain token-pool ViTs (timm vit_*_patch*_224.dino) convert")
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head."):
            log.info("from_timm_state_dict: dropping timm classifier %s %s", k, tuple(v.shape))
            continue
        out[k] = v
    return out


def to_timm(backbone: nn.Module, img_size: int = 224, **timm_kwargs) -> nn.Module:
    """A timm model (built with pretrained=False, no download) holding `backbone`'s weights."""
    import timm
    backbone = getattr(backbone, "_orig_mod", backbone)
    kw = dict(pretrained=False, num_classes=0, img_size=img_size, depth=len(backbone.blocks))
    kw.update(timm_kwargs)
    model = timm.create_model(timm_model_name(backbone), **kw)
    model.load_state_dict(to_timm_state_dict(backbone, img_size), strict=True)
    return model
