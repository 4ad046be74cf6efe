"""FLOP counts of the backbones and of a DINO step, for MFU (nanoGPT's estimate_mfu).

ViT forward FLOPs of one crop with L = 1 + R + (H//p)(W//p) tokens (CLS, R registers, patches),
width D, FFN hidden Hm, depth n (2 FLOPs per multiply-add, GEMMs and attention only; norms,
softmax, GELU / SiLU, LayerScale and the RoPE rotation are O(L*D) and left out, as in the
usual MFU convention):
    patch embed  2 * (L-1-R) * (C*p*p) * D
    per block    2*L*D*3D (qkv) + 2*L*D*D (proj) + 2*m*L*D*Hm (FFN: m = 2 matrices for the MLP,
                 3 for SwiGLU) + 4 * L^2 * D (q k^T and attn @ v)
ViT-B/8: 224 px -> L = 785, 156.4 GFLOP; 96 px -> L = 145, 25.5 GFLOP
(attention 14.5 % / 3.1 % of them). Convnets: counted by torch.utils.flop_counter.FlopCounterMode
on a meta-device copy of the model (convnet.convnet_forward_flops: convolutions and GEMMs, no
memory, no fvcore). A DINO step counts the student forward + backward (3x forward) on every crop
and the teacher forward on the globals.
"""
from __future__ import annotations

import torch.nn as nn


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def vit_forward_flops(model: nn.Module, size, *, attention: bool = True) -> float:
    """Forward FLOPs of one crop of `size` (int or (H, W)) through the backbone (a convnet:
    counted on the meta device)."""
    from dino_fast.model.ffn import ffn_matmul_widths
    model = getattr(model, "_orig_mod", model)
    h, w = _hw(size)
    if not hasattr(model, "blocks"):
        from dino_fast.model.convnet import convnet_forward_flops
        return convnet_forward_flops(model.arch, h, w)
    p = model.patch_embed.patch_size
    c = model.patch_embed.proj.in_channels
    d = model.embed_dim
    mats, hidden = ffn_matmul_widths(model.blocks[0].mlp)
    npatch = (h // p) * (w // p)
    L = npatch + getattr(model, "num_prefix_tokens", 1)
    flops = 2.0 * npatch * c * p * p * d
    per_block = 2.0 * L * d * (3 * d + d + mats * hidden)
    if attention:
        per_block += 4.0 * L * L * d
    return flops + len(model.blocks) * per_block


def head_forward_flops(head: nn.Module) -> float:
    """Forward FLOPs of one row through a DINOHead (its Linear layers)."""
    total = 0.0
    for m in head.modules():
        if isinstance(m, nn.Linear):
            total += 2.0 * m.in_features * m.out_features
        elif hasattr(m, "weight_v"):
            total += 2.0 * m.weight_v.shape[0] * m.weight_v.shape[1]
    return total


def dino_step_flops_per_image(backbone: nn.Module, global_size=224, local_size=96, n_global: int = 2,
                              n_local: int = 10, head: nn.Module | None = None, teacher: bool = True) -> float:
    """FLOPs per image of one DINO training step: student forward + backward
    (3x forward) on all crops, teacher forward on the global crops."""
    g = vit_forward_flops(backbone, global_size)
    loc = vit_forward_flops(backbone, local_size) if n_local else 0.0
    hd = head_forward_flops(head) if head is not None else 0.0
    student = 3.0 * (n_global * (g + hd) + n_local * (loc + hd))
    return student + (n_global * (g + hd) if teacher else 0.0)


def multicrop_fwd_bwd_flops(backbone: nn.Module, sizes, batch: int, head: nn.Module | None = None) -> float:
    """Forward + backward FLOPs of a multi-crop batch (`sizes`: one entry per crop)."""
    hd = head_forward_flops(head) if head is not None else 0.0
    return 3.0 * batch * sum(vit_forward_flops(backbone, s) + hd for s in sizes)


def flops_per_image(model: nn.Module, global_size=224, local_size=96, n_global: int = 2, n_local: int = 10,
                    head: nn.Module | None = None) -> float:
    """Training FLOPs per image of a DINO step (alias of dino_step_flops_per_image;
    `model` may be a MultiCropWrapper, whose head is then counted)."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "backbone"):
        head = head if head is not None else model.head
        model = model.backbone
    return dino_step_flops_per_image(model, global_size, local_size, n_global, n_local, head=head)
backbone_forward_flops = vit_forward_flops  # any backbone: ViT formula, convnet counted on meta
