"""The backbones dino-fast builds, by name.

ViTs: width, depth, heads, MLP ratio and default feed-forward layer of the DINO (tiny, small,
base), DINOv2 (large, giant2) and DINOv3 (so400m, huge2, 7b) `vit_*` factories; every option
of VisionTransformer (registers, LayerScale, RoPE, ...) can be added to any of them.
Any other name is a convnet (convnet.py): a torchvision classification model (`resnet50`,
`convnext_small`), or a timm one (`timm:convnext_small`, or any timm name torchvision lacks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial


@dataclass(frozen=True)
class VitArch:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"


VIT_ARCHS: dict[str, VitArch] = {
    "vit_tiny": VitArch(192, 12, 3),
    "vit_small": VitArch(384, 12, 6),
    "vit_base": VitArch(768, 12, 12),
    "vit_large": VitArch(1024, 24, 16),
    # DINOv3's vit_so400m (SigLIP's shape-optimised 400M: 1152 wide, 27 deep, 16 heads there; 18 here)
    "vit_so400m": VitArch(1152, 27, 18, 3.777777778),
    "vit_huge2": VitArch(1280, 32, 20),
    # DINOv2's ViT-g/14: 1536 wide, 24 heads of 64, SwiGLU (w12/w3 layout)
    "vit_giant2": VitArch(1536, 40, 24, 4.0, "swiglufused"),
    # DINOv3's ViT-7B/16: 4096 wide, 32 heads of 128, SwiGLU aligned to 64, ratio 3 (hidden 8192)
    "vit_7b": VitArch(4096, 40, 32, 3.0, "swiglu64"),
}


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


def vit_arch(arch: str) -> VitArch:
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {arch!r}; choose one of {', '.join(VIT_ARCHS)}")
    return VIT_ARCHS[arch]


def build_vit(arch: str, patch_size: int = 16, *, norm_eps: float = 1e-6, **kwargs) -> nn.Module:
    """VisionTransformer `arch` (qkv bias on, LayerNorm eps 1e-6 as the reference and DINOv2;
    DINOv3 uses 1e-5); kwargs override the table (depth, mlp_ratio, ffn_layer, ...) and pass
    every VisionTransformer option through."""
    import torch.nn as nn

    from dino_fast.model.vit import VisionTransformer
    a = vit_arch(arch)
    kw = dict(embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
              ffn_layer=a.ffn_layer, qkv_bias=True)
    kw.update(kwargs)
    model = VisionTransformer(patch_size=patch_size, norm_layer=partial(nn.LayerNorm, eps=norm_eps), **kw)
    model.arch = arch
    return model


def build_backbone(arch: str, patch_size: int = 16, **kwargs) -> nn.Module:
    """A ViT of the table, or a convnet by torchvision / timm name (kwargs: ViT options, or for a
    convnet `drop_path_rate` where the model takes one)."""
    if is_vit(arch):
        return build_vit(arch, patch_size, **kwargs)
    from dino_fast.model.convnet import build_convnet
    return build_convnet(arch, drop_path_rate=kwargs.get("drop_path_rate", 0.0))


def vit_large(patch_size=16, **kwargs):
    return build_vit("vit_large", patch_size, **kwargs)


def vit_so400m(patch_size=16, **kwargs):
    return build_vit("vit_so400m", patch_size, **kwargs)


def vit_huge2(patch_size=16, **kwargs):
    return build_vit("vit_huge2", patch_size, **kwargs)


def vit_giant2(patch_size=16, **kwargs):
    return build_vit("vit_giant2", patch_size, **kwargs)


def vit_7b(patch_size=16, **kwargs):
    return build_vit("vit_7b", patch_size, **kwargs)
