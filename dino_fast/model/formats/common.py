"""Helpers shared by the layout converters."""
from __future__ import annotations

import re

import torch

from dino_fast.model.backbone_config import CheckpointError  # noqa: F401  (re-exported)


def unchunk_blocks(sd: dict) -> dict:
    """DINOv2 training checkpoints with block_chunks > 0 name blocks `blocks.<chunk>.<index>.`;
    the index is global, so the chunk level is dropped."""
    if not any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        return sd
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def packed_swiglu(sd: dict, fc1: str = "blocks.0.mlp.fc1.weight", fc2: str = "blocks.0.mlp.fc2.weight") -> bool:
    """A packed SwiGLU stored as fc1 (2H, D) / fc2 (D, H) (timm's GluMlp)."""
    return fc1 in sd and fc2 in sd and sd[fc1].shape[0] == 2 * sd[fc2].shape[1]


def rename_mlp(sd: dict, mapping: dict[str, str]) -> dict:
    """Rename `blocks.N.mlp.<old>.` -> `blocks.N.mlp.<new>.` for every pair of mapping."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(blocks\.\d+\.mlp\.)([A-Za-z0-9_]+)(\..+)", k)
        if m and m.group(2) in mapping:
            k = m.group(1) + mapping[m.group(2)] + m.group(3)
        out[k] = v
    return out
