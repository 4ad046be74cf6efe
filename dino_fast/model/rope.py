"""Rotary position embeddings as DINOv3 (`dinov3/layers/rope_position_encoding.py`),
on packed multi-crop tokens.

Per crop of an h x w patch grid, patch (i, j) gets coordinates
    c = 2 * ((i + 0.5) / n_h, (j + 0.5) / n_w) - 1      in [-1, 1]^2
with (n_h, n_w) = (h, w) for normalize_coords="separate", (max, max) for "max", (min, min) for "min".
Training-time augmentations (only in train mode, one draw per call, shared by the rows of a group):
    shift:   c += U(-s, s)^2;   jitter: c *= exp(U(-ln J, ln J))^2 (per axis);   rescale: c *= exp(U(-ln R, ln R)).
Periods per head (head dim hd, hd % 4 == 0): base^(2k / (hd/2)) for k < hd/4, or log-spaced
between min_period and max_period. Angles a = 2 pi c / period, laid out [a_h (hd/4), a_w (hd/4)]
and tiled twice; q and k are rotated "half" style:  x * cos(a) + rotate_half(x) * sin(a),
rotate_half([x1, x2]) = [-x2, x1]. Prefix tokens (CLS, registers) are not rotated.

On the packed (T, D) stream the tables are (T, hd), one row per token: cos = 1, sin = 0 on the
prefix tokens (an exact identity), each group's grid on its patches, repeated over its rows. So one
elementwise pass rotates every crop of every resolution with its own grid, for every attention
backend. Tables are computed in fp32 (DINOv3's 7B config uses fp32 RoPE) and q, k are rotated in fp32,
then cast back.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from dino_fast.model.layout import PackedLayout

NORMALIZE_COORDS = ("separate", "min", "max")


class RopeTables:
    """cos / sin tables (T, hd) fp32 of one packed forward.

    A plain class (not a tensor, tuple or dataclass) on purpose: FSDP2's forward-input casting
    walks tensors, tuples and dataclasses and would cast the tables to bf16 at every block."""

    __slots__ = ("cos", "sin")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in the tables' dtype, cast back to x's dtype."""
    xf = x.to(cos.dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_rope_packed(qkv: torch.Tensor, rope: RopeTables, heads: int) -> torch.Tensor:
    """Rotate q and k of packed qkv (T, 3D) with per-token tables (T, hd); v unchanged."""
    T = qkv.shape[0]
    q, k, v = qkv.view(T, 3, heads, -1).unbind(1)           # (T, H, hd) each
    cos, sin = rope.cos[:, None], rope.sin[:, None]          # (T, 1, hd)
    return torch.stack((rope_apply(q, cos, sin), rope_apply(k, cos, sin), v), dim=1).reshape(T, -1)


class RopePositionEmbedding(nn.Module):
    """DINOv3's RoPE: fixed periods (a persistent buffer `periods`, as DINOv3's, so the
    state dict records base / min / max period), no learnable weights."""

    def __init__(self, embed_dim: int, num_heads: int, base: float | None = 100.0,
                 min_period: float | None = None, max_period: float | None = None,
                 normalize_coords: str = "separate", shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = None):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs a head dim divisible by 4: embed_dim {embed_dim} / {num_heads} heads")
        both = min_period is not None and max_period is not None
        if (base is None and not both) or (base is not None and both):
            raise ValueError("RoPE: give either rope_base or both rope_min_period and rope_max_period")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"rope_normalize_coords={normalize_coords!r}: choose one of {', '.join(NORMALIZE_COORDS)}")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.register_buffer("periods", self._periods(), persistent=True)

    def _periods(self) -> torch.Tensor:
        n = self.head_dim // 4
        if self.base is not None:
            return self.base ** (2 * torch.arange(n, dtype=torch.float32) / (self.head_dim // 2))  # (hd/4,)
        ratio = self.max_period / self.min_period
        return ratio ** torch.linspace(0, 1, n, dtype=torch.float32) / ratio * self.max_period

    def reset_periods(self) -> None:
        with torch.no_grad():
            self.periods.copy_(self._periods().to(self.periods.device))

    @property
    def augments(self) -> bool:
        return self.training and any(v is not None for v in (self.shift_coords, self.jitter_coords,
                                                             self.rescale_coords))

    def coords(self, h: int, w: int, device) -> torch.Tensor:
        """(h*w, 2) coordinates in [-1, 1] (row-major patches), augmented in train mode."""
        dd = dict(device=device, dtype=torch.float32)
        nh, nw = {"separate": (h, w), "max": (max(h, w),) * 2, "min": (min(h, w),) * 2}[self.normalize_coords]
        ch = torch.arange(0.5, h, **dd) / nh
        cw = torch.arange(0.5, w, **dd) / nw
        c = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)  # (hw, 2)
        c = 2.0 * c - 1.0
        if self.training and self.shift_coords is not None:
            c = c + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)[None]
        if self.training and self.jitter_coords is not None:
            j = math.log(self.jitter_coords)
            c = c * torch.empty(2, **dd).uniform_(-j, j).exp()[None]
        if self.training and self.rescale_coords is not None:
            r = math.log(self.rescale_coords)
            c = c * torch.empty(1, **dd).uniform_(-r, r).exp()
        return c

    def sincos(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of an h x w grid, each (h*w, hd) fp32."""
        periods = self.periods.float()
        c = self.coords(h, w, periods.device)
        angles = 2 * math.pi * c[:, :, None] / periods[None, None, :]  # (hw, 2, hd/4)
        angles = angles.flatten(1, 2).tile(2)                           # (hw, hd)
        return angles.cos(), angles.sin()

    def packed(self, layout: PackedLayout, grids: tuple[tuple[int, int], ...], prefix: int) -> RopeTables:
        """Tables (T, hd) for packed tokens: identity on the `prefix` tokens of every row,
        each group's own grid on its patches."""
        coss, sins = [], []
        for (_, _, _, r, n), (h, w) in zip(layout.groups(), grids):
            if n != prefix + h * w:
                raise ValueError(f"RoPE: a row of {n} tokens does not hold {prefix} prefix tokens + a {h}x{w} grid")
            cos, sin = self.sincos(h, w)                               # (hw, hd)
            cos = torch.cat((cos.new_ones(prefix, cos.shape[1]), cos))  # (n, hd)
            sin = torch.cat((sin.new_zeros(prefix, sin.shape[1]), sin))
            coss.append(cos.expand(r, n, -1).reshape(r * n, -1))
            sins.append(sin.expand(r, n, -1).reshape(r * n, -1))
        cat = (lambda t: t[0]) if len(coss) == 1 else torch.cat
        return RopeTables(cat(coss), cat(sins))

    def extra_repr(self) -> str:
        p = f"base={self.base}" if self.base is not None else f"periods=[{self.min_period}, {self.max_period}]"
        return (f"head_dim={self.head_dim}, {p}, normalize_coords={self.normalize_coords}, shift={self.shift_coords}, "
                f"jitter={self.jitter_coords}, rescale={self.rescale_coords}")
