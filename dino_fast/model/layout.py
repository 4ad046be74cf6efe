"""How the crops of one multi-crop step are packed into one token sequence.

A step has G resolution groups (e.g. 2 global crops at 224 px, then N local
crops at 96 px). Group g holds R_g = n_crops_g * B rows (one row = one crop of
one image) of L_g tokens each (1 CLS + patches). Packing concatenates every
row's tokens into one (T, D) matrix, T = sum_g R_g * L_g, group-major then
row-major, so group g's tokens are the contiguous slice
[token_offsets[g], token_offsets[g] + R_g * L_g) and view as (R_g, L_g, D).

The layout is made of Python ints only (hashable, static under torch.compile);
masks derived from it (xformers BlockDiagonalMask, flex BlockMask, cu_seqlens)
are cached per (layout, device).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackedLayout:
    rows: tuple[int, ...]    # R_g: rows (crop x image) of group g
    tokens: tuple[int, ...]  # L_g: tokens per row of group g (CLS + patches)
    # Only these two fields: FSDP2's forward-input casting rebuilds dataclass
    # arguments with dataclasses.replace(**all fields), so derived values are
    # properties, not init=False fields.

    def __post_init__(self):
        if len(self.rows) != len(self.tokens) or not self.rows:
            raise ValueError(f"PackedLayout needs one (rows, tokens) pair per group, got {self}")

    @property
    def token_offsets(self) -> tuple[int, ...]:
        """Start of each group in the packed token dimension, plus the end."""
        out = [0]
        for r, n in zip(self.rows, self.tokens):
            out.append(out[-1] + r * n)
        return tuple(out)

    @property
    def row_offsets(self) -> tuple[int, ...]:
        """Start of each group in the packed row dimension, plus the end."""
        out = [0]
        for r in self.rows:
            out.append(out[-1] + r)
        return tuple(out)

    @classmethod
    def single(cls, rows: int, tokens: int) -> "PackedLayout":
        return cls((rows,), (tokens,))

    @property
    def num_groups(self) -> int:
        return len(self.rows)

    @property
    def total_tokens(self) -> int:
        return self.token_offsets[-1]

    @property
    def total_rows(self) -> int:
        return self.row_offsets[-1]

    @property
    def seqlens(self) -> list[int]:
        """Length of every row's sequence, in packed order."""
        return [n for r, n in zip(self.rows, self.tokens) for _ in range(r)]

    @property
    def max_tokens(self) -> int:
        return max(self.tokens)

    def groups(self) -> list[tuple[int, int, int, int, int]]:
        """(group index, token start, token end, rows, tokens per row) per group."""
        off = self.token_offsets
        return [(g, off[g], off[g + 1], r, n) for g, (r, n) in enumerate(zip(self.rows, self.tokens))]
