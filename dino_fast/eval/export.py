"""Export a checkpoint's backbone (teacher by default) in three formats:

- "reference":   the plain backbone state dict the reference hubconf models
                 load (`model.load_state_dict(sd, strict=True)`), no prefixes;
- "timm":        a state dict for timm's `vit_*_patch*_224(.dino)` (num_classes=0),
                 via dino_fast.model.timm_interop (pos_embed optionally resampled
                 to another timm input size);
- "safetensors": the weights plus the model config in the metadata, so
                 `dino_fast.load` rebuilds any size without guessing
                 (needs the optional `safetensors` package: pip install 'dino-fast[export]').
All three load back with `dino_fast.load(path)`. Files are written atomically.
"""
from __future__ import annotations

import json
import os

import torch

from dino_fast.eval.io import atomic_torch_save, atomic_write
from dino_fast.eval.load import SAFETENSORS_FORMAT, BackboneConfig, load_with_config

FORMATS = ("reference", "timm", "safetensors")


def _plain_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if not k.startswith("head.")}


def save_safetensors(state_dict: dict, cfg: BackboneConfig, path: str, extra: dict | None = None) -> str:
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("--format safetensors needs the safetensors package: pip install 'dino-fast[export]' "
                          "(or use --format reference)") from e
    meta = {"format": SAFETENSORS_FORMAT, "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "arch": str(cfg.arch or ""), "patch_size": str(cfg.patch_size)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata=meta))


def export_checkpoint(checkpoint: str, output: str, fmt: str = "reference", checkpoint_key: str = "teacher", *,
                      timm_img_size: int | None = None, **load_kwargs) -> BackboneConfig:
    """Write `checkpoint`'s backbone to `output` in `fmt`; returns its config."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if os.path.abspath(output) == os.path.abspath(checkpoint):
        raise ValueError(f"--output {output} is the input checkpoint; choose another file name")
    model, cfg = load_with_config(checkpoint, checkpoint_key, **load_kwargs)
    if fmt == "reference":
        atomic_torch_save(_plain_state_dict(model), output)
    elif fmt == "timm":
        from dino_fast.model.timm_interop import to_timm_state_dict
        sd = {k: v.contiguous() for k, v in to_timm_state_dict(model, timm_img_size).items()}
        atomic_torch_save(sd, output)
    else:
        save_safetensors(_plain_state_dict(model), cfg, output,
                         {"source": os.path.basename(checkpoint), "checkpoint_key": checkpoint_key})
    return cfg
