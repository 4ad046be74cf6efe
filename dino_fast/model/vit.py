"""Vision Transformer of the DINO reference (facebookresearch/dino
vision_transformer.py): same constructor, parameter names, init and outputs,
run on packed tokens so that all crops of a multi-crop step go through every
block once.

The DINOv2 / DINOv3 features are constructor options, each off by default (and
then absent from the state dict, so the reference keys and numbers are
unchanged): register (storage) tokens, LayerScale, SwiGLU feed-forward layers
(ffn.py), qkv bias on/off with DINOv3's masked k bias, rotary position
embeddings instead of the learned absolute ones (rope.py), a mask token for
masked-image modelling, and DINOv3's separate CLS norm for the local crops.
Parameter names follow the official DINOv2 checkpoints (`register_tokens`,
`mask_token`, `blocks.N.ls1.gamma`, `blocks.N.mlp.w12`), DINOv3's for what only
DINOv3 has (`rope_embed.periods`, `mlp.w1/w2/w3`, `local_cls_norm`). Each row
(crop x image) holds [CLS, registers, patches]; `num_prefix_tokens` = 1 + registers.

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
from dino_fast.model.attention import (NEEDS_AUX, _group_qkv, attention_aux, math_attention, packed_attention,
                                       resolve_backend)
from dino_fast.model.checkpointing import checkpoint_mode, run_checkpointed
from dino_fast.model.drop_path import drop_add_residual_packed, kept_layout
from dino_fast.model.ffn import LayerScale, Mlp, build_ffn
from dino_fast.model.layout import PackedLayout
from dino_fast.model.rope import RopePositionEmbedding, RopeTables, apply_rope_packed

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
class Attention(nn.Module):
    """Multi-head self-attention of packed tokens. mask_k_bias: the k third of the qkv bias is
    held at zero in the forward (DINOv3's LinearKMaskedBias; with RoPE a k bias would otherwise
    add a position-dependent term)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 backend: str = "sdpa", mask_k_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend
        self.mask_k_bias = bool(mask_k_bias and qkv_bias)

    def _qkv(self, x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        if self.mask_k_bias:
            d = self.qkv.out_features // 3
            bias = torch.cat((self.qkv.bias[:d], self.qkv.bias.new_zeros(d), self.qkv.bias[2 * d:]))
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)  # (T, 3D)
        return qkv if rope is None else apply_rope_packed(qkv, rope, self.num_heads)

    def forward(self, x: torch.Tensor, layout: PackedLayout, aux=None, rope: RopeTables | None = None) -> torch.Tensor:
        qkv = self._qkv(x, rope)  # (T, 3D)
        out = packed_attention(qkv, layout, self.num_heads, self.scale, self.backend,
                               self.attn_drop.p, self.training, aux)  # (T, D)
        return self.proj_drop(self.proj(out))

    def attention_probs(self, x: torch.Tensor, layout: PackedLayout,
                        rope: RopeTables | None = None) -> list[torch.Tensor]:
        """Softmax probabilities per group, (R_g, heads, L_g, L_g) (reference math)."""
        qkv = self._qkv(x, rope)
        return [math_attention(*_group_qkv(qkv, s, e, r, n, self.num_heads), self.scale)[1]
                for _, s, e, r, n in layout.groups()]


class Block(nn.Module):
    """Pre-norm block: x + drop_path(ls1(attn(norm1(x)))), then x + drop_path(ls2(ffn(norm2(x)))).
    ls1/ls2 (LayerScale) exist only with layerscale_init; ffn_layer: see ffn.py."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, backend: str = "sdpa",
                 layerscale_init: float | None = None, ffn_layer: str = "mlp", ffn_hidden_dim: int | None = None,
                 mask_k_bias: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, backend=backend, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else None
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        if ffn_layer == "mlp" and ffn_hidden_dim is None:
            self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        else:
            self.mlp = build_ffn(ffn_layer, dim, mlp_ratio, ffn_hidden_dim, drop)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else None

        self.checkpointing: bool | str = False   # False | "full" | "selective" (checkpointing.py)
        self.efficient_drop_path = False          # branches on the kept rows only (drop_path.py)

    def forward(self, x: torch.Tensor, layout: PackedLayout, aux=None, rope: RopeTables | None = None,
                aux_kept=None) -> torch.Tensor:
        """aux_kept: the attention mask object of the kept-row layout (efficient drop path)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return run_checkpointed(self.checkpointing, self._forward, x, layout, aux, rope, aux_kept)
        return self._forward(x, layout, aux, rope, aux_kept)

    def _attn_branch(self, x, layout, aux=None, rope=None) -> torch.Tensor:
        y = self.attn(self.norm1(x), layout, aux, rope)
        return y if self.ls1 is None else self.ls1(y)

    def _ffn_branch(self, x, layout=None, aux=None, rope=None) -> torch.Tensor:
        y = self.mlp(self.norm2(x))
        return y if self.ls2 is None else self.ls2(y)

    def drops_rows(self) -> bool:
        """The efficient stochastic depth runs in this forward."""
        return self.efficient_drop_path and self.training and self.drop_path.drop_prob > 0.0

    def _forward(self, x, layout, aux, rope, aux_kept) -> torch.Tensor:
        if self.drops_rows():
            p = self.drop_path.drop_prob
            x = drop_add_residual_packed(x, layout, self._attn_branch, p, aux_kept, rope)
            return drop_add_residual_packed(x, layout, self._ffn_branch, p)
        x = x + self.drop_path(self._attn_branch(x, layout, aux, rope), layout)
        return x + self.drop_path(self._ffn_branch(x), layout)


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
    once here and logged. use_checkpoint / activation_checkpointing: activation checkpointing per
    block: False, True or "full" (recompute the block), "selective" (keep matmul and attention outputs,
    recompute the element-wise ops; checkpointing.py). efficient_drop_path: stochastic depth runs each
    residual branch on the kept rows only (drop_path.py).

    DINOv2 / DINOv3 options (keyword-only; the defaults are the reference DINO ViT):
    num_register_tokens: learned tokens after CLS in every row (DINOv2 registers, DINOv3 storage tokens).
    layerscale_init: LayerScale on both residual branches, gamma initialised to this (DINOv2/v3: 1e-5);
        None or 0: no LayerScale.
    ffn_layer, ffn_hidden_dim: "mlp" or a SwiGLU layout (ffn.py), and an explicit hidden width.
    mask_k_bias: the k third of the qkv bias is held at zero (DINOv3's released ViTs).
    pos_embed: "learned" (absolute, resized per crop size) or "rope" (DINOv3 RoPE, no absolute embedding).
    rope_base, rope_min_period, rope_max_period, rope_normalize_coords, rope_shift_coords,
        rope_jitter_coords, rope_rescale_coords: DINOv3's RoPE (rope.py); the last three act in train mode.
    pos_interp_offset, pos_interp_antialias: resizing the learned embedding to another grid. 0.1 and
        False: the reference (bicubic with scale_factor (grid + 0.1) / side; DINOv2 without registers);
        0: bicubic to the exact grid size (DINOv2 with registers: antialias True; timm likewise).
    mask_token: a learned (1, D) token that replaces masked patches (forward_features(crops, masks)).
    untie_global_and_local_cls_norm: a second final norm `local_cls_norm` for the CLS and register tokens
        of the local crops (the resolution groups after the first), used in train mode only (DINOv3).
    """

    def __init__(self, img_size=(224,), patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=nn.LayerNorm, attention: str = "auto",
                 use_checkpoint: bool = False, activation_checkpointing: bool | str | None = None, *,
                 num_register_tokens: int = 0, layerscale_init: float | None = None, ffn_layer: str = "mlp",
                 ffn_hidden_dim: int | None = None, mask_k_bias: bool = False, pos_embed: str = "learned",
                 rope_base: float | None = 100.0, rope_min_period: float | None = None,
                 rope_max_period: float | None = None, rope_normalize_coords: str = "separate",
                 rope_shift_coords: float | None = None, rope_jitter_coords: float | None = None,
                 rope_rescale_coords: float | None = None, pos_interp_offset: float = 0.1,
                 pos_interp_antialias: bool = False, mask_token: bool = False,
                 untie_global_and_local_cls_norm: bool = False, efficient_drop_path: bool = False, **kwargs):
        super().__init__()
        if kwargs:
            log.debug("VisionTransformer ignores extra arguments %s (as the reference does)", sorted(kwargs))
        if isinstance(img_size, int):
            img_size = [img_size]
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if pos_embed not in ("learned", "rope"):
            raise ValueError(f"pos_embed={pos_embed!r}: choose 'learned' (absolute) or 'rope'")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens={num_register_tokens} must be >= 0")
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_register_tokens = int(num_register_tokens)
        self.num_prefix_tokens = 1 + self.num_register_tokens
        self.pos_interp_offset = float(pos_interp_offset)
        self.pos_interp_antialias = bool(pos_interp_antialias)

        self.patch_embed = PatchEmbed(img_size=img_size[0], patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if pos_embed == "learned" else None
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        self.rope_embed = (RopePositionEmbedding(embed_dim, num_heads, rope_base, rope_min_period, rope_max_period,
                                                 rope_normalize_coords, rope_shift_coords, rope_jitter_coords,
                                                 rope_rescale_coords) if pos_embed == "rope" else None)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                  layerscale_init=layerscale_init, ffn_layer=ffn_layer, ffn_hidden_dim=ffn_hidden_dim,
                  mask_k_bias=mask_k_bias)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.local_cls_norm = norm_layer(embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
        self.apply(self._init_weights)
        self.set_attention(attention)
        self.checkpointing = use_checkpoint if activation_checkpointing is None else activation_checkpointing
        for blk in self.blocks:
            blk.efficient_drop_path = bool(efficient_drop_path)

    # ------------------------------------------------------------ activation checkpointing
    @property
    def checkpointing(self) -> bool | str:
        """Activation checkpointing of every block: False, "full" or "selective" (checkpointing.py)."""
        return self.blocks[0].checkpointing if len(self.blocks) else False

    @checkpointing.setter
    def checkpointing(self, value) -> None:
        mode = checkpoint_mode(value)
        for blk in self.blocks:
            blk.checkpointing = mode

    @property
    def use_checkpoint(self) -> bool:
        return bool(self.checkpointing)

    @use_checkpoint.setter
    def use_checkpoint(self, value) -> None:
        self.checkpointing = value

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
        exactly as the reference: bicubic with scale_factor (grid + 0.1) / sqrt(N)
        (pos_interp_offset 0: bicubic to the grid size, optionally antialiased)."""
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        side = int(math.sqrt(N))
        if self.pos_interp_offset:
            # the +0.1 avoids floating point error in the output size (as the reference does);
            # interpolate uses the given scale_factor, not the output size, for the
            # sampling positions, so it is kept exactly as the reference has it.
            w0, h0 = w0 + self.pos_interp_offset, h0 + self.pos_interp_offset
            size = dict(scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)))
        else:
            size = dict(size=(w0, h0))
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                        mode="bicubic", antialias=self.pos_interp_antialias, **size)
        if int(w0) != patch_pos_embed.shape[-2] or int(h0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(f"positional embedding interpolation gave a {tuple(patch_pos_embed.shape[-2:])} "
                               f"grid for a {int(w0)}x{int(h0)} patch grid")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    @torch.no_grad()
    def resize_pos_embed(self, img_size: int) -> None:
        """Store the learned embedding resized (as interpolate_pos_encoding does at runtime) for
        img_size x img_size crops, so they need no interpolation (continued pretraining)."""
        if self.pos_embed is None or img_size == self.patch_embed.img_size:
            return
        p = self.patch_embed.patch_size
        tokens = self.pos_embed.new_zeros(1, 1 + (img_size // p) ** 2, self.embed_dim)
        new = self.interpolate_pos_encoding(tokens, img_size, img_size).detach().clone()
        self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        self.patch_embed.img_size = img_size
        self.patch_embed.num_patches = (img_size // p) ** 2

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + registers + (H//p)(W//p), D): CLS, registers, patches with
        positions. masks (B, (H//p)(W//p)) bool: those patches are replaced by mask_token before the
        positions are added (DINOv2's prepare_tokens_with_masks); registers get no position."""
        B, _, w, h = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given but the ViT has no mask token: build it with mask_token=True")
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks {tuple(masks.shape)} do not match the {tuple(x.shape[:2])} patches")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return self.pos_drop(x)

    def _embed(self, crops, masks=None):
        """Packed tokens (T, D), layout, patch grid (h, w) and masks (or None) per group.
        Consecutive crops of equal (H, W) form one group (the reference's MultiCropWrapper
        grouping), rows ordered crop-major; masks: one entry (or None) per crop."""
        if isinstance(crops, torch.Tensor):
            crops, masks = [crops], [masks]
        elif masks is None:
            masks = [None] * len(crops)
        if len(crops) == 0:
            raise ValueError("VisionTransformer got an empty list of crops")
        if len(masks) != len(crops):
            raise ValueError(f"{len(masks)} masks for {len(crops)} crops: give one mask (or None) per crop")
        groups: list[list] = []
        for c, m in zip(crops, masks):
            if c.dim() != 4:
                raise ValueError(f"each crop must be (B, C, H, W), got shape {tuple(c.shape)}")
            if groups and groups[-1][0][0].shape[1:] == c.shape[1:]:
                groups[-1].append((c, m))
            else:
                groups.append([(c, m)])
        p = self.patch_embed.patch_size
        tokens, rows, lens, grids, group_masks = [], [], [], [], []
        for g in groups:
            x = g[0][0] if len(g) == 1 else torch.cat([c for c, _ in g])
            m = None
            if any(mi is not None for _, mi in g):
                m = torch.cat([mi if mi is not None else torch.zeros(c.shape[0], (c.shape[-2] // p) * (c.shape[-1] // p),
                                                                     dtype=torch.bool, device=c.device)
                               for c, mi in g])
            t = self.prepare_tokens(x, m)  # (R_g, L_g, D)
            rows.append(t.shape[0])
            lens.append(t.shape[1])
            grids.append((x.shape[-2] // p, x.shape[-1] // p))
            group_masks.append(m)
            tokens.append(t.reshape(-1, t.shape[-1]))
        x = tokens[0] if len(tokens) == 1 else torch.cat(tokens)  # (T, D)
        return x, PackedLayout(tuple(rows), tuple(lens)), tuple(grids), group_masks

    def pack(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, PackedLayout]:
        """Embed a batch or a list of crops into packed tokens (T, D) + layout."""
        x, layout, _, _ = self._embed(crops)
        return x, layout

    def _aux(self, x: torch.Tensor, layout: PackedLayout):
        return attention_aux(layout, self.attention, x.device) if self.attention in NEEDS_AUX else None

    def _rope(self, layout: PackedLayout, grids, block: int, previous: RopeTables | None) -> RopeTables | None:
        """RoPE tables for block `block`: computed once per forward, or afresh for every block while
        the coordinate augmentations are on (DINOv3 draws them per block and per resolution)."""
        if self.rope_embed is None:
            return None
        if previous is not None and not self.rope_embed.augments:
            return previous
        return self.rope_embed.packed(layout, grids, self.num_prefix_tokens)

    def _run_block(self, blk: Block, x: torch.Tensor, layout: PackedLayout, aux, rope=None,
                   aux_kept=None) -> torch.Tensor:
        return blk(x, layout, aux, rope, aux_kept)   # activation checkpointing is inside the block

    def _aux_kept(self, x: torch.Tensor, layout: PackedLayout, blk: Block, cache: dict):
        """The attention mask object of the kept-row layout of `blk` (efficient drop path)."""
        if self.attention not in NEEDS_AUX or not blk.drops_rows():
            return None
        kept = kept_layout(layout, blk.drop_path.drop_prob)
        if kept not in cache:
            cache[kept] = attention_aux(kept, self.attention, x.device)
        return cache[kept]

    def _blocks(self, x: torch.Tensor, layout: PackedLayout, grids) -> torch.Tensor:
        aux, rope, kept = self._aux(x, layout), None, {}
        for i, blk in enumerate(self.blocks):
            rope = self._rope(layout, grids, i, rope)
            x = self._run_block(blk, x, layout, aux, rope, self._aux_kept(x, layout, blk, kept))
        return x

    @staticmethod
    def cls_rows(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """CLS token of every row of packed x (T, D) -> (R, D)."""
        out = [x[s:e].view(r, n, -1)[:, 0] for _, s, e, r, n in layout.groups()]
        return out[0] if len(out) == 1 else torch.cat(out)

    @staticmethod
    def unpack(x: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
        """Packed (T, D) -> per group (R_g, L_g, D)."""
        return [x[s:e].view(r, n, -1) for _, s, e, r, n in layout.groups()]

    def _local_norm(self, layout: PackedLayout) -> bool:
        return self.local_cls_norm is not None and self.training and layout.num_groups > 1

    # ------------------------------------------------------------ forwards
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """CLS features: (B, D) for a batch, (sum_i B_i, D) crop-major for a list."""
        x, layout, grids, _ = self._embed(x)
        x = self._blocks(x, layout, grids)
        cls = self.cls_rows(x, layout)  # (R, D)
        if self._local_norm(layout):
            r0 = layout.rows[0]
            return self.head(torch.cat((self.norm(cls[:r0]), self.local_cls_norm(cls[r0:]))))
        return self.head(self.norm(cls))

    def forward_features(self, crops: torch.Tensor | Sequence[torch.Tensor], masks=None):
        """All normalised output tokens, DINOv2's `forward_features` on the packed path.

        crops: a batch (B, C, H, W) -> one dict; or a list of crops -> a list of dicts, one per
        resolution group (consecutive crops of equal size, crop-major: [2 globals, N locals] -> 2
        dicts). masks: for a batch, (B, N) bool or None; for a list, one (B_i, N_i) bool or None
        per crop; masked patches are replaced by mask_token. Each dict:
            x_norm_clstoken     (R_g, D)        CLS after the final norm (local_cls_norm for the
                                                 local groups in train mode when untied)
            x_norm_regtokens    (R_g, n_reg, D) registers after the final norm
            x_norm_patchtokens  (R_g, N_g, D)   patch tokens after the final norm
            x_prenorm           (R_g, L_g, D)   all tokens before the final norm
            masks               (R_g, N_g) bool or None
        """
        x, layout, grids, group_masks = self._embed(crops, masks)
        x = self._blocks(x, layout, grids)
        xn = self.norm(x)  # (T, D)
        p = self.num_prefix_tokens
        out = []
        for (g, s, e, r, n), m in zip(layout.groups(), group_masks):
            pre, nrm = x[s:e].view(r, n, -1), xn[s:e].view(r, n, -1)
            prefix = self.local_cls_norm(pre[:, :p]) if g > 0 and self._local_norm(layout) else nrm[:, :p]
            out.append({"x_norm_clstoken": prefix[:, 0], "x_norm_regtokens": prefix[:, 1:],
                        "x_norm_patchtokens": nrm[:, p:], "x_prenorm": pre, "masks": m})
        return out[0] if isinstance(crops, torch.Tensor) else out

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, (B, heads, L, L) (L counts CLS and registers)."""
        x, layout, grids, _ = self._embed(x)
        aux, rope = self._aux(x, layout), None
        for i, blk in enumerate(self.blocks[:-1]):
            rope = self._rope(layout, grids, i, rope)
            x = blk(x, layout, aux, rope)
        rope = self._rope(layout, grids, len(self.blocks) - 1, rope)
        blk = self.blocks[-1]
        probs = blk.attn.attention_probs(blk.norm1(x), layout, rope)
        return probs[0] if len(probs) == 1 else probs

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normalized output tokens (B, L, D) of the last `n` blocks (CLS, registers, patches)."""
        x, layout, grids, _ = self._embed(x)
        aux, rope = self._aux(x, layout), None
        output = []
        for i, blk in enumerate(self.blocks):
            rope = self._rope(layout, grids, i, rope)
            x = blk(x, layout, aux, rope)
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
