"""Feed-forward layers and LayerScale of the DINO, DINOv2 and DINOv3 ViT blocks.

Layouts (parameter names are the ones of the official checkpoints, so their
state dicts load without renaming):
- "mlp":         fc1 (D -> H), GELU, fc2 (H -> D)                       (DINO, DINOv2 S/B/L, DINOv3 S/B/L)
- "swiglufused": w12 (D -> 2H') packed [gate | value], silu(gate) * value, w3 (H' -> D)
                 with H' = (int(2H/3) + 7) // 8 * 8                      (DINOv2 ViT-g, `ffn_layer="swiglufused"`)
- "swiglu", "swiglu32", "swiglu64", "swiglu128":
                 w1 (gate) and w2 (value), D -> H'', w3 (H'' -> D), H'' = int(2H/3) rounded up to a
                 multiple of 8 / 32 / 64 / 128                          (DINOv3 `SwiGLUFFN(align_to=...)`)
H = int(D * mlp_ratio) is the "MLP hidden" of the config; the SwiGLU layouts keep the parameter
count of an H-wide MLP (3 matrices of 2H/3 instead of 2 of H). `hidden_dim` overrides H' / H''
(the loaders read it from the weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FFN_LAYERS = ("mlp", "swiglufused", "swiglu", "swiglu32", "swiglu64", "swiglu128")


class Mlp(nn.Module):
    """The reference ViT MLP: fc1, GELU, fc2 (dropout after each)."""

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


class SwiGLUFused(nn.Module):
    """DINOv2's SwiGLUFFNFused (xformers SwiGLU layout): one packed w12 GEMM."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # (T, H') each
        return self.w3(F.silu(gate) * value)


class SwiGLU(nn.Module):
    """DINOv3's SwiGLUFFN: separate gate (w1) and value (w2) projections."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale `gamma` (DINOv2 / DINOv3 `ls1`, `ls2`)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def ffn_hidden_dim(ffn_layer: str, dim: int, mlp_ratio: float) -> int:
    """The hidden width the official code builds for `ffn_layer` at this ratio."""
    hidden = int(dim * mlp_ratio)
    if ffn_layer == "mlp":
        return hidden
    if ffn_layer == "swiglufused":
        return (int(hidden * 2 / 3) + 7) // 8 * 8
    if ffn_layer.startswith("swiglu"):
        align = int(ffn_layer[len("swiglu"):] or 8)
        d = int(hidden * 2 / 3)
        return d + (-d % align)
    raise ValueError(f"ffn_layer={ffn_layer!r}: choose one of {', '.join(FFN_LAYERS)}")


def build_ffn(ffn_layer: str, dim: int, mlp_ratio: float, hidden_dim: int | None = None,
              drop: float = 0.0) -> nn.Module:
    """The feed-forward module of one block (see the module docstring for the layouts)."""
    hidden = hidden_dim or ffn_hidden_dim(ffn_layer, dim, mlp_ratio)
    if ffn_layer == "mlp":
        return Mlp(in_features=dim, hidden_features=hidden, drop=drop)
    if ffn_layer == "swiglufused":
        return SwiGLUFused(dim, hidden)
    if ffn_layer in FFN_LAYERS:
        return SwiGLU(dim, hidden)
    raise ValueError(f"ffn_layer={ffn_layer!r}: choose one of {', '.join(FFN_LAYERS)}")


def ffn_matmul_widths(ffn: nn.Module) -> tuple[int, int]:
    """(matrices of D x hidden, hidden) of an FFN module: 2 for the MLP, 3 for SwiGLU (FLOP counts)."""
    if isinstance(ffn, Mlp):
        return 2, ffn.fc1.out_features
    if isinstance(ffn, SwiGLUFused):
        return 3, ffn.w3.in_features
    if isinstance(ffn, SwiGLU):
        return 3, ffn.w3.in_features
    raise TypeError(f"unknown feed-forward module {type(ffn).__name__}")
