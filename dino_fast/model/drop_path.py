"""Efficient stochastic depth on packed tokens: run a residual branch only on the kept rows.

The reference `drop_path` computes the branch f(x) on every row (one crop of one image) and
multiplies the dropped rows by zero. DINOv2 / DINOv3 (`drop_add_residual_stochastic_depth`,
`SelfAttentionBlock._forward_list`) instead draw, per resolution group of R_g rows, a random
subset of k_g = max(int(R_g * (1 - p)), 1) rows (`randperm(R_g)[:k_g]`), run the branch on
those rows only and add it back scaled by R_g / k_g:

    x_r + (R_g / k_g) * f(x)_r    for the k_g kept rows r,      x_r for the others.

Every row is kept with probability k_g / R_g, so E[output] = x + f(x): the same expectation as
the reference's per-row Bernoulli(1 - p) mask with 1/(1 - p) scaling. The branch is row-local
(attention stays within a row, norms / FFN / LayerScale are per token), so for a fixed draw the
result equals masking the full-batch branch with those rows and that scale, exactly (tested in
tests/test_drop_path.py). k_g is a Python int fixed by (R_g, p): the kept layout is static, so a
compiled block sees the same shapes every step; only the row indices (a device tensor) change.
Cost: the branch runs on about (1 - p) of the tokens, plus one gather and one scatter; saved for
the backward: the branch's activations on the kept tokens and the (T_kept,) token index.
"""
from __future__ import annotations

from typing import Callable

import torch

from dino_fast.model.layout import PackedLayout

Branch = Callable[[torch.Tensor, PackedLayout, object, object], torch.Tensor]


def kept_rows(rows: int, drop_prob: float) -> int:
    """k = max(int(rows * (1 - p)), 1), DINOv2 / DINOv3's sample_subset_size."""
    return max(int(rows * (1.0 - drop_prob)), 1)


def kept_layout(layout: PackedLayout, drop_prob: float) -> PackedLayout:
    """The layout of the kept rows: k_g rows per group, same tokens per row."""
    return PackedLayout(tuple(kept_rows(r, drop_prob) for r in layout.rows), layout.tokens)


def draw_rows(layout: PackedLayout, drop_prob: float, device) -> list[torch.Tensor]:
    """Per group, the kept row indices within the group, (k_g,) int64: randperm(R_g)[:k_g]."""
    return [torch.randperm(r, device=device)[:kept_rows(r, drop_prob)] for r in layout.rows]


def token_index(layout: PackedLayout, rows: list[torch.Tensor]) -> torch.Tensor:
    """Packed token positions (T_kept,) of the kept rows, in kept-layout order."""
    idx = []
    for (g, s, _, _, n), r in zip(layout.groups(), rows):
        idx.append((s + r[:, None] * n + torch.arange(n, device=r.device)).reshape(-1))  # (k_g * n,)
    return idx[0] if len(idx) == 1 else torch.cat(idx)


def token_scale(layout: PackedLayout, kept: PackedLayout, dtype, device) -> torch.Tensor | float:
    """R_g / k_g per kept token, (T_kept, 1); a float when it is the same for every group."""
    scales = [r / k for r, k in zip(layout.rows, kept.rows)]
    if all(s == scales[0] for s in scales):
        return scales[0]
    return torch.cat([torch.full((k * n, 1), s, dtype=dtype, device=device)
                      for s, k, n in zip(scales, kept.rows, kept.tokens)])


def drop_add_residual_packed(x: torch.Tensor, layout: PackedLayout, branch: Branch, drop_prob: float,
                             aux=None, rope=None, rows: list[torch.Tensor] | None = None) -> torch.Tensor:
    """x (T, D) + the stochastic-depth residual branch(x) computed on the kept rows only.

    branch(x_kept (T_kept, D), kept_layout, aux, rope_kept) -> (T_kept, D); aux: the attention
    mask object of the KEPT layout (attention_aux(kept_layout(...)), or None); rope: the full
    packed RopeTables (gathered here). rows: a fixed draw (per group, kept row indices), else
    drawn with draw_rows."""
    kept = kept_layout(layout, drop_prob)
    if rows is None:
        rows = draw_rows(layout, drop_prob, x.device)
    idx = token_index(layout, rows)  # (T_kept,)
    rope_kept = None
    if rope is not None:
        from dino_fast.model.rope import RopeTables
        rope_kept = RopeTables(rope.cos[idx], rope.sin[idx])
    x_kept = x[idx]                           # (T_kept, D)
    y = branch(x_kept, kept, aux, rope_kept)  # (T_kept, D)
    y = y * token_scale(layout, kept, y.dtype, y.device)
    # the kept rows are distinct: write x_kept + y over them (index_put keeps only idx for the
    # backward; index_add would also keep y, a second copy of the branch output)
    return x.index_put((idx,), x_kept + y.to(x.dtype))
