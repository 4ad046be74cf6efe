"""`BackboneConfig`: everything needed to rebuild a backbone, and how to read it from the
tensors of a state dict in dino-fast's own layout (the DINO / DINOv2 parameter names, see vit.py).

What the tensors cannot tell is settled by the conventions of the released models:
- LayerNorm eps: 1e-5 with RoPE (DINOv3), else 1e-6 (DINO, DINOv2);
- learned position embedding resizing ("pos_interp"): the reference's (bicubic, scale factor
  (grid + 0.1) / side) without registers, exact-size antialiased bicubic with registers (DINOv2's
  released register models and timm);
- RoPE coordinate normalisation "separate"; the k third of the qkv bias is masked with RoPE (DINOv3);
- heads: the width's standard count (tiny 3, small 6, base 12, large 16, so400m 18, huge 20, giant 24,
  7B 32), the RoPE period count (head dim / 4) when there is one, else width / 64.
A training checkpoint's args and the safetensors metadata carry the exact config instead.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# how the learned position embedding is resized: (offset, antialias) of VisionTransformer
POS_INTERP = {"reference": (0.1, False), "antialias": (0.0, True), "size": (0.0, False)}
# width -> heads of the standard ViTs
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1152: 18, 1280: 20, 1536: 24, 4096: 32}
LAYOUTS = ("dino", "dinov2", "dinov3", "timm", "convnet")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model."""


@dataclass
class BackboneConfig:
    """A ViT (kind "vit") or a torchvision / timm convnet (kind "convnet", named by arch)."""
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: int = 224
    arch: str | None = None
    num_register_tokens: int = 0
    layerscale_init: float = 0.0          # 0: no LayerScale
    ffn_layer: str = "mlp"
    ffn_hidden_dim: int = 0               # 0: from mlp_ratio and the layout's rule
    pos_embed: str = "learned"            # learned | rope
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize_coords: str = "separate"
    norm_eps: float = 1e-6
    pos_interp: str = "reference"
    mask_token: bool = False
    mask_k_bias: bool = False
    untie_global_and_local_cls_norm: bool = False
    layout: str = "dino"                  # the layout the weights came in (export writes it back by default)
    kind: str = "vit"

    def vit_kwargs(self) -> dict:
        """VisionTransformer constructor arguments."""
        offset, antialias = POS_INTERP[self.pos_interp]
        return dict(img_size=[self.img_size], patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                    num_register_tokens=self.num_register_tokens,
                    layerscale_init=self.layerscale_init or None, ffn_layer=self.ffn_layer,
                    ffn_hidden_dim=self.ffn_hidden_dim or None, pos_embed=self.pos_embed,
                    rope_base=self.rope_base, rope_min_period=self.rope_min_period,
                    rope_max_period=self.rope_max_period, rope_normalize_coords=self.rope_normalize_coords,
                    pos_interp_offset=offset, pos_interp_antialias=antialias, mask_token=self.mask_token,
                    mask_k_bias=self.mask_k_bias,
                    untie_global_and_local_cls_norm=self.untie_global_and_local_cls_norm)

    def build(self, attention: str = "auto", **overrides) -> nn.Module:
        """The backbone (random init). overrides: VisionTransformer arguments for training
        (drop_path_rate, activation_checkpointing, rope_rescale_coords, ...)."""
        if self.kind == "convnet":
            from dino_fast.model.convnet import build_convnet
            return build_convnet(self.arch, drop_path_rate=overrides.get("drop_path_rate", 0.0))
        from functools import partial

        from dino_fast.model.vit import VisionTransformer
        kw = self.vit_kwargs()
        kw.update(overrides)
        model = VisionTransformer(num_classes=0, norm_layer=partial(nn.LayerNorm, eps=self.norm_eps),
                                  attention=attention, **kw)
        if self.arch:
            model.arch = self.arch
        return model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def name(self) -> str:
        if self.kind == "convnet":
            return str(self.arch)
        base = self.arch or f"vit_d{self.embed_dim}x{self.depth}"
        extras = [f"reg{self.num_register_tokens}"] if self.num_register_tokens else []
        if self.pos_embed == "rope":
            extras.append("rope")
        if self.ffn_layer != "mlp":
            extras.append(self.ffn_layer)
        return f"{base}/{self.patch_size}" + (f" ({', '.join(extras)})" if extras else "")


def arch_name(embed_dim: int, num_heads: int, depth: int | None = None) -> str | None:
    """The registry name of a ViT of this width and head count (any depth), or None."""
    from dino_fast.model.registry import VIT_ARCHS
    for name, a in VIT_ARCHS.items():
        if a.embed_dim == embed_dim and a.num_heads == num_heads:
            return name
    return None


def rope_params(periods: torch.Tensor) -> dict:
    """rope_base (or min/max period) that give these DINOv3 periods (hd/4 of them)."""
    p = periods.detach().float().cpu()
    n = len(p)
    if n < 2 or abs(float(p[0]) - 1.0) > 1e-3:
        return dict(rope_base=None, rope_min_period=float(p[0]), rope_max_period=float(p[-1]))
    base = float(p[-1]) ** (n / (n - 1))          # periods[n-1] = base^((n-1) / n); bf16 periods: ~0.4 %
    nice = round(base, 1 - int(math.floor(math.log10(base))))  # 2 significant digits: 100, 10000
    if abs(nice - base) <= 1e-2 * base:           # a round base (released: 100), also from bf16 periods
        base = float(nice)
    elif abs(round(base) - base) <= 1e-4 * base:  # fp32 periods: the integer base
        base = float(round(base))
    return dict(rope_base=base)


def infer_from_state_dict(sd: dict, hints: dict | None = None, num_heads: int | None = None,
                          path: str = "checkpoint") -> BackboneConfig:
    """BackboneConfig of a ViT state dict in dino-fast's layout (see the module docstring).
    hints: fields fixed by the source layout (they win over the conventions)."""
    hints = dict(hints or {})
    missing = [k for k in ("cls_token", "patch_embed.proj.weight") if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: no ViT backbone weights (missing {missing}; first keys: "
                              f"{sorted(sd)[:5]}). Expected a DINO / DINOv2 / DINOv3 ViT or a timm ViT")
    w = sd["patch_embed.proj.weight"]              # (D, 3, p, p)
    D, p = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    rope = "pos_embed" not in sd
    periods = sd.get("rope_embed.periods")
    heads = num_heads or hints.pop("num_heads", None)
    if not heads and periods is not None:
        heads = D // (4 * periods.numel())
    heads = heads or STANDARD_HEADS.get(D)
    if not heads:
        heads = max(1, D // 64)
        log.warning("%s: embed_dim %d is not a standard ViT; assuming %d heads (pass num_heads= to override)",
                    path, D, heads)
    heads = int(heads)
    if D % heads:
        raise CheckpointError(f"{path}: embed_dim {D} is not divisible by {heads} heads; pass the right num_heads")
    cfg = BackboneConfig(patch_size=p, embed_dim=D, depth=depth, num_heads=heads,
                         qkv_bias="blocks.0.attn.qkv.bias" in sd, arch=arch_name(D, heads),
                         layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else 0.0,
                         num_register_tokens=int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0,
                         mask_token="mask_token" in sd,
                         untie_global_and_local_cls_norm="local_cls_norm.weight" in sd)
    if "blocks.0.mlp.w12.weight" in sd:
        cfg.ffn_layer, cfg.ffn_hidden_dim = "swiglufused", int(sd["blocks.0.mlp.w3.weight"].shape[1])
    elif "blocks.0.mlp.w1.weight" in sd:
        cfg.ffn_layer, cfg.ffn_hidden_dim = "swiglu", int(sd["blocks.0.mlp.w3.weight"].shape[1])
    elif "blocks.0.mlp.fc1.weight" in sd:
        cfg.mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / D
        if int(D * cfg.mlp_ratio) != sd["blocks.0.mlp.fc1.weight"].shape[0]:
            cfg.ffn_hidden_dim = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    if cfg.ffn_layer != "mlp":
        cfg.mlp_ratio = cfg.ffn_hidden_dim * 3 / 2 / D
    if rope:
        cfg.pos_embed, cfg.norm_eps = "rope", 1e-5
        cfg.mask_k_bias = cfg.qkv_bias
        if periods is not None and periods.device.type != "meta":
            cfg.rope_base = None
            cfg.__dict__.update(rope_params(periods))
    else:
        npatch = sd["pos_embed"].shape[1] - 1
        side = int(round(math.sqrt(npatch)))
        if side * side != npatch:
            raise CheckpointError(f"{path}: pos_embed holds {npatch} patch positions, not a square grid")
        cfg.img_size = side * p
        cfg.pos_interp = "antialias" if cfg.num_register_tokens else "reference"
    cfg.layout = family(cfg)
    for k, v in hints.items():
        setattr(cfg, k, v)
    return cfg


def family(cfg: BackboneConfig) -> str:
    """The official layout a ViT config belongs to: dinov3 (RoPE), dinov2 (registers, LayerScale,
    SwiGLU or a mask token with a learned position embedding) or dino (the reference ViT)."""
    if cfg.kind == "convnet":
        return "convnet"
    if cfg.pos_embed == "rope":
        return "dinov3"
    extras = cfg.num_register_tokens or cfg.layerscale_init or cfg.ffn_layer != "mlp" or cfg.mask_token
    return "dinov2" if extras else "dino"


def train_fields(cfg) -> dict:
    """BackboneConfig fields of a training config (a TrainConfig or its dict): the arch's table
    entry plus the model fields of the config (0 / "auto" = the conventions above)."""
    from dino_fast.model.registry import is_vit, vit_arch
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    arch = get("arch", "vit_small")
    if not is_vit(arch):
        return dict(kind="convnet", arch=arch, layout="convnet", patch_size=0, depth=0, num_heads=0, embed_dim=0)
    a = vit_arch(arch)
    rope = get("pos_embed", "learned") == "rope"
    regs = int(get("num_register_tokens", 0) or 0)
    ls = float(get("layerscale_init", 0.0) or 0.0)
    ffn = get("ffn_layer", "auto") or "auto"
    ffn = a.ffn_layer if ffn == "auto" else ffn
    qkv_bias = bool(get("qkv_bias", True))
    mask_token = bool(get("mask_token", False))
    min_p, max_p = get("rope_min_period", 0.0) or None, get("rope_max_period", 0.0) or None
    by_periods = bool(min_p and max_p)
    pos_interp = get("pos_interp", "auto") or "auto"
    if pos_interp == "auto":
        pos_interp = "antialias" if regs else "reference"
    fields = dict(kind="vit", arch=arch, patch_size=int(get("patch_size", 16)), embed_dim=a.embed_dim,
                depth=int(get("depth", 0) or a.depth), num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
                qkv_bias=qkv_bias, img_size=224, num_register_tokens=regs, layerscale_init=ls, ffn_layer=ffn,
                ffn_hidden_dim=0, pos_embed="rope" if rope else "learned",
                rope_base=None if by_periods else float(get("rope_base", 100.0) or 100.0),
                rope_min_period=float(min_p) if by_periods else None,
                rope_max_period=float(max_p) if by_periods else None,
                rope_normalize_coords=get("rope_normalize_coords", "separate") or "separate",
                norm_eps=float(get("norm_eps", 0.0) or (1e-5 if rope else 1e-6)), pos_interp=pos_interp,
                mask_token=mask_token, mask_k_bias=rope and qkv_bias,
                untie_global_and_local_cls_norm=bool(get("untie_global_and_local_cls_norm", False)))
    fields["layout"] = family(BackboneConfig(**fields))
    return fields


def from_train(cfg) -> BackboneConfig:
    """The backbone a training config builds."""
    return BackboneConfig(**train_fields(cfg))


def config_from_model(model: nn.Module) -> BackboneConfig:
    """The BackboneConfig of a built dino-fast backbone (ViT or convnet)."""
    model = getattr(model, "_orig_mod", model)
    if not hasattr(model, "blocks"):
        arch = getattr(model, "arch", None)
        if arch is None:
            raise ValueError(f"{type(model).__name__} is neither a dino-fast ViT nor a convnet built by dino-fast")
        return BackboneConfig(kind="convnet", arch=arch, patch_size=0, depth=0, num_heads=0,
                              embed_dim=int(model.embed_dim), layout="convnet")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    cfg = infer_from_state_dict(sd, num_heads=model.num_heads)
    cfg.img_size = model.patch_embed.img_size
    cfg.norm_eps = float(model.norm.eps)
    pos = (model.pos_interp_offset, model.pos_interp_antialias)
    cfg.pos_interp = next((k for k, v in POS_INTERP.items() if v == pos), "reference")
    cfg.mask_k_bias = bool(model.blocks[0].attn.mask_k_bias)
    if model.rope_embed is not None:
        r = model.rope_embed
        cfg.rope_base, cfg.rope_min_period, cfg.rope_max_period = r.base, r.min_period, r.max_period
        cfg.rope_normalize_coords = r.normalize_coords
    cfg.arch = getattr(model, "arch", None) or cfg.arch
    return cfg
