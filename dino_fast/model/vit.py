"""Vision Transformer of the DINO reference (facebookresearch/dino
vision_transformer.py): same constructor, parameter names, init and outputs,
run on packed tokens so that all crops of a multi-crop step go through every
block once.

Internally the residual stream is a (T, D) matrix of the tokens of all rows
(crop x image) described by a `PackedLayout`; a plain (B, 3, H, W) batch is the
one-group case. LayerNorm / qkv / proj / MLP GEMMs run over all T tokens at
once; only attention (attention.py) and stochastic depth see the rows.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dino_fast.model.attention import (NEEDS_AUX, _group_qkv, attention_aux, math_attention, packed_attention,
                                       resolve_backend)
from dino_fast.model.layout import PackedLayout

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- stochastic depth
def drop_path_packed(y: torch.Tensor, layout: PackedLayout, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per row of packed tokens y (T, D): each (crop, image)
    row's residual branch is zeroed with probability p, else scaled by 1/(1-p),
    exactly the reference's per-sample `drop_path` applied group by group
    (one uniform per row, drawn in packed row order)."""
    if drop_prob == 0.0 or not training:
        return y
    keep = 1.0 - drop_prob
    mask = (keep + torch.rand(layout.total_rows, dtype=y.dtype, device=y.device)).floor_()  # (R,)
    per_token = torch.cat([mask[layout.row_offsets[g]:layout.row_offsets[g + 1], None].expand(r, n).reshape(-1)
                           for g, _, _, r, n in layout.groups()])  # (T,)
    return y.div(keep) * per_token[:, None]


class DropPath(nn.Module):
    """Drop paths (stochastic depth) per sample, on packed tokens."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        return drop_path_packed(x, layout, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# ---------------------------------------------------------------- block
class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor, layout: PackedLayout, aux=None) -> torch.Tensor:
        qkv = self.qkv(x)  # (T, 3D)
        out = packed_attention(qkv, layout, self.num_heads, self.scale, self.backend,
                               self.attn_drop.p, self.training, aux)  # (T, D)
        return self.proj_drop(self.proj(out))

    def attention_probs(self, x: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
        """Softmax probabilities per group, (R_g, heads, L_g, L_g) (reference math)."""
        qkv = self.qkv(x)
        return [math_attention(*_group_qkv(qkv, s, e, r, n, self.num_heads), self.scale)[1]
                for _, s, e, r, n in layout.groups()]


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, layout: PackedLayout, aux=None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), layout, aux), layout)
        x = x + self.drop_path(self.mlp(self.norm2(x)), layout)
        return x


class PatchEmbed(nn.Module):
    """Image to patch embedding: (B, C, H, W) -> (B, (H//p) * (W//p), D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------- model
class VisionTransformer(nn.Module):
    """Vision Transformer (reference constructor) with packed multi-crop forward.

    attention: "auto" | "xformers" | "flash" | "flex" | "sdpa" | "math", resolved
    once here and logged. use_checkpoint: activation checkpointing per block."""

    def __init__(self, img_size=(224,), patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=nn.LayerNorm, attention: str = "auto",
                 use_checkpoint: bool = False, activation_checkpointing: bool | None = None, **kwargs):
        super().__init__()
        if kwargs:
            log.debug("VisionTransformer ignores extra arguments %s (as the reference does)", sorted(kwargs))
        if isinstance(img_size, int):
            img_size = [img_size]
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.use_checkpoint = bool(use_checkpoint if activation_checkpointing is None else activation_checkpointing)

        self.patch_embed = PatchEmbed(img_size=img_size[0], patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        self.set_attention(attention)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------ backend
    def set_attention(self, attention: str = "auto") -> str:
        """Resolve and set the attention backend of every block (logged)."""
        self.attention = resolve_backend(attention)
        for blk in self.blocks:
            blk.attn.backend = self.attention
        log.info("dino_fast ViT attention backend: %s (requested %r)", self.attention, attention)
        return self.attention

    # ------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Positional embedding for tokens x (B, 1+npatch, D) of an image with
        shape[-2] = w and shape[-1] = h (the reference's names), computed
        exactly as the reference: bicubic with scale_factor (grid + 0.1) / sqrt(N)."""
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        # the +0.1 avoids floating point error in the output size (as the reference does);
        # interpolate uses the given scale_factor, not the output size, for the
        # sampling positions, so it is kept exactly as the reference has it.
        w0, h0 = w0 + 0.1, h0 + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        if int(w0) != patch_pos_embed.shape[-2] or int(h0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(f"positional embedding interpolation gave a {tuple(patch_pos_embed.shape[-2:])} "
                               f"grid for a {int(w0)}x{int(h0)} patch grid")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + (H//p)(W//p), D) with CLS and positions."""
        B, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def pack(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, PackedLayout]:
        """Embed a batch or a list of crops into packed tokens (T, D) + layout.
        Consecutive crops of equal (H, W) form one group (the reference's
        MultiCropWrapper grouping), rows ordered crop-major."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("VisionTransformer got an empty list of crops")
        groups: list[list[torch.Tensor]] = []
        for c in crops:
            if c.dim() != 4:
                raise ValueError(f"each crop must be (B, C, H, W), got shape {tuple(c.shape)}")
            if groups and groups[-1][0].shape[1:] == c.shape[1:]:
                groups[-1].append(c)
            else:
                groups.append([c])
        tokens, rows, lens = [], [], []
        for g in groups:
            t = self.prepare_tokens(g[0] if len(g) == 1 else torch.cat(g))  # (R_g, L_g, D)
            rows.append(t.shape[0])
            lens.append(t.shape[1])
            tokens.append(t.reshape(-1, t.shape[-1]))
        x = tokens[0] if len(tokens) == 1 else torch.cat(tokens)  # (T, D)
        return x, PackedLayout(tuple(rows), tuple(lens))

    def _aux(self, x: torch.Tensor, layout: PackedLayout):
        return attention_aux(layout, self.attention, x.device) if self.attention in NEEDS_AUX else None

    def _run_block(self, blk: Block, x: torch.Tensor, layout: PackedLayout, aux) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, layout, aux, use_reentrant=False)
        return blk(x, layout, aux)

    @staticmethod
    def cls_rows(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """CLS token of every row of packed x (T, D) -> (R, D)."""
        out = [x[s:e].view(r, n, -1)[:, 0] for _, s, e, r, n in layout.groups()]
        return out[0] if len(out) == 1 else torch.cat(out)

    @staticmethod
    def unpack(x: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
        """Packed (T, D) -> per group (R_g, L_g, D)."""
        return [x[s:e].view(r, n, -1) for _, s, e, r, n in layout.groups()]

    # ------------------------------------------------------------ forwards
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """CLS features: (B, D) for a batch, (sum_i B_i, D) crop-major for a list."""
        x, layout = self.pack(x)
        aux = self._aux(x, layout)
        for blk in self.blocks:
            x = self._run_block(blk, x, layout, aux)
        return self.head(self.norm(self.cls_rows(x, layout)))  # (R, D)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, (B, heads, L, L)."""
        x, layout = self.pack(x)
        aux = self._aux(x, layout)
        for blk in self.blocks[:-1]:
            x = blk(x, layout, aux)
        blk = self.blocks[-1]
        probs = blk.attn.attention_probs(blk.norm1(x), layout)
        return probs[0] if len(probs) == 1 else probs

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normalized output tokens (B, L, D) of the last `n` blocks."""
        x, layout = self.pack(x)
        aux = self._aux(x, layout)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, layout, aux)
            if len(self.blocks) - i <= n:
                out = self.unpack(self.norm(x), layout)
                output.append(out[0] if len(out) == 1 else out)
        return output


def _vit(patch_size, embed_dim, num_heads, **kwargs):
    kwargs.setdefault("depth", 12)
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_tiny(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 192, 3, **kwargs)


def vit_small(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 384, 6, **kwargs)


def vit_base(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 768, 12, **kwargs)
