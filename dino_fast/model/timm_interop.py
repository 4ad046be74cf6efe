"""dino-fast backbones to timm models and back: timm's VisionTransformer for the DINO
(`vit_*_patch*_224.dino`) and DINOv2 (`vit_*_patch14[_reg4]_dinov2`) ViTs, timm's Eva for the
DINOv3 ones (`vit_*_patch16_dinov3[_qkvb]`); the key mappings are in dino_fast.model.formats.

A timm VisionTransformer has a fixed input size, so exporting for another image size resamples
pos_embed with the model's own interpolation (the timm model then gives our features at that
size); Eva's RoPE works at any size (dynamic_img_size). timm builds `head`, `fc_norm`, `norm_pre`
as Identity here (num_classes=0, token pooling), so they have no weights.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from dino_fast.model.backbone_config import BackboneConfig, CheckpointError, config_from_model

log = logging.getLogger(__name__)

_DINO_TAGS = {(384, 16), (384, 8), (768, 16), (768, 8)}  # timm has .dino weights for these
_DINO_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_DINOV3_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 4096: "7b"}


def _cfg(obj) -> BackboneConfig:
    return obj if isinstance(obj, BackboneConfig) else config_from_model(obj)


def _is_plain(cfg: BackboneConfig) -> bool:
    return (cfg.pos_embed == "learned" and not cfg.num_register_tokens and not cfg.layerscale_init
            and cfg.ffn_layer == "mlp")


def timm_model_name(backbone) -> str:
    """timm architecture matching a backbone (or its BackboneConfig), e.g.
    'vit_small_patch16_224.dino', 'vit_large_patch14_reg4_dinov2', 'vit_base_patch16_dinov3_qkvb'."""
    cfg = _cfg(backbone)
    d, p = cfg.embed_dim, cfg.patch_size
    if cfg.pos_embed == "rope":
        size = _DINOV3_SIZES.get(d)
        if size == "small" and cfg.ffn_layer != "mlp":
            size = "small_plus"
        if size is None:
            raise ValueError(f"no timm DINOv3 name for embed_dim={d}: timm has {sorted(_DINOV3_SIZES)}")
        return f"vit_{size}_patch16_dinov3" + ("_qkvb" if cfg.qkv_bias or size == "tiny" else "")
    if _is_plain(cfg):
        if d not in _DINO_SIZES:
            raise ValueError(f"no timm ViT name for embed_dim={d}: timm names exist for {sorted(_DINO_SIZES)}")
        name = f"vit_{_DINO_SIZES[d]}_patch{p}_224"
        return name + ".dino" if (d, p) in _DINO_TAGS else name
    if d not in _DINOV2_SIZES:
        raise ValueError(f"no timm DINOv2 name for embed_dim={d}: timm has {sorted(_DINOV2_SIZES)}")
    return f"vit_{_DINOV2_SIZES[d]}_patch14{'_reg4' if cfg.num_register_tokens else ''}_dinov2"


def timm_create_kwargs(backbone, img_size: int | None = None) -> dict:
    """Keyword arguments for `timm.create_model(timm_model_name(...), pretrained=False, **kw)` so
    the timm model has this backbone's shape (depth, input size, patch, registers, qkv bias)."""
    cfg = _cfg(backbone)
    kw = dict(num_classes=0, depth=cfg.depth)
    if cfg.pos_embed == "rope":
        kw.update(patch_size=cfg.patch_size, num_reg_tokens=cfg.num_register_tokens, qkv_bias=cfg.qkv_bias,
                  rope_temperature=cfg.rope_base)
        return kw
    kw.update(img_size=img_size or cfg.img_size, patch_size=cfg.patch_size)
    if not _is_plain(cfg):
        kw.update(reg_tokens=cfg.num_register_tokens, no_embed_class=bool(cfg.num_register_tokens),
                  qkv_bias=cfg.qkv_bias, init_values=cfg.layerscale_init or None)
    return kw


def to_timm_state_dict(backbone: nn.Module, img_size: int | None = None) -> dict[str, torch.Tensor]:
    """timm-loadable state dict of a dino_fast (or reference) ViT backbone.
    img_size: the timm model's input size if not the checkpoint's own (pos_embed
    is resampled exactly as the backbone's interpolate_pos_encoding)."""
    from dino_fast.model.formats import timm_eva, timm_vit
    backbone = getattr(backbone, "_orig_mod", backbone)
    cfg = config_from_model(backbone)
    sd = {k: v.detach().clone() for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    if cfg.pos_embed == "rope":
        return timm_eva.from_internal(sd, cfg)
    if img_size is not None:
        p = backbone.patch_embed.patch_size
        tokens = torch.zeros(1, 1 + (img_size // p) ** 2, backbone.embed_dim)
        with torch.no_grad():
            sd["pos_embed"] = backbone.interpolate_pos_encoding(tokens, img_size, img_size).detach().clone()
    return timm_vit.from_internal(sd, cfg)


def from_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dino-fast-named backbone state dict of a timm ViT / Eva state dict (classifier dropped;
    layers with no counterpart refused). RoPE periods are not in a timm state dict: a model
    built for it has them (load with strict=False on `rope_embed.periods`, or use dino_fast.load)."""
    from dino_fast.model.formats import timm_eva, timm_vit
    sd = {k: v for k, v in state_dict.items()}
    for k in [k for k in sd if k.startswith("head.")]:
        log.info("from_timm_state_dict: dropping timm classifier %s %s", k, tuple(sd[k].shape))
        sd.pop(k)
    try:
        if timm_eva.matches(sd):
            return timm_eva.to_internal(sd)[0]
        return timm_vit.to_internal(sd)[0]
    except CheckpointError as e:
        raise ValueError(str(e)) from e


def to_timm(backbone: nn.Module, img_size: int = 224, **timm_kwargs) -> nn.Module:
    """A timm model (built with pretrained=False, no download) holding `backbone`'s weights."""
    import timm
    backbone = getattr(backbone, "_orig_mod", backbone)
    kw = timm_create_kwargs(backbone, img_size)
    kw.update(timm_kwargs)
    model = timm.create_model(timm_model_name(backbone), pretrained=False, **kw)
    model.load_state_dict(to_timm_state_dict(backbone, img_size), strict=True)
    return model
