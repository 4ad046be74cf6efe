"""Export a checkpoint's backbone (teacher by default):

- "reference":   the official backbone layout of the model's family, what its repository's
                 model loads with `load_state_dict(sd, strict=True)`: the reference DINO ViT's,
                 DINOv2's (registers, LayerScale, SwiGLU w12/w3, mask_token) or DINOv3's (RoPE:
                 storage_tokens, rope_embed.periods, qkv bias_mask); a convnet's library names;
- "dinov2", "dinov3": that official layout explicitly (an error when the model has no form in it);
- "timm":        a state dict for timm's VisionTransformer (`vit_*_224.dino`, `vit_*_dinov2`) or
                 Eva (`vit_*_dinov3`) with num_classes=0 (pos_embed optionally resampled to another
                 timm input size), or a timm / torchvision-ResNet convnet's;
- "safetensors": dino-fast's layout plus the model config in the metadata, so `dino_fast.load`
                 rebuilds any model without guessing (pip install 'dino-fast[export]').
All of them load back with `dino_fast.load(path)`. Files are written atomically.
"""
from __future__ import annotations

import json
import os

import torch

from dino_fast.eval.io import atomic_torch_save, atomic_write
from dino_fast.eval.export_formats import FORMATS
from dino_fast.eval.load import SAFETENSORS_FORMAT, BackboneConfig, CheckpointError, load_with_config


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


def layout_state_dict(model: torch.nn.Module, cfg: BackboneConfig, fmt: str,
                      timm_img_size: int | None = None) -> dict:
    """The backbone's weights in export format `fmt` (not safetensors)."""
    from dino_fast.model.backbone_config import family
    from dino_fast.model.formats import dinov2, dinov3
    sd = _plain_state_dict(model)
    if cfg.kind == "convnet":
        if fmt == "timm" and not _timm_compatible(cfg.arch):
            raise CheckpointError(f"{cfg.arch} is a torchvision model with no timm counterpart of the same names; "
                                  "export it as reference or safetensors")
        if fmt in ("dinov2", "dinov3"):
            raise CheckpointError(f"{cfg.arch} is a convnet: export it as reference, timm or safetensors")
        return sd
    if fmt == "reference":
        fmt = family(cfg)
    if fmt == "dino":
        extras = family(cfg)
        if extras != "dino":
            raise CheckpointError(f"{cfg.name} is not a reference DINO ViT")
        return sd
    if fmt == "dinov2":
        return dinov2.from_internal(sd, cfg)
    if fmt == "dinov3":
        return dinov3.from_internal(sd, cfg)
    if fmt == "timm":
        from dino_fast.model.timm_interop import to_timm_state_dict
        return {k: v.contiguous() for k, v in to_timm_state_dict(model, timm_img_size).items()}
    raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _timm_compatible(arch: str) -> bool:
    """timm's ResNets use torchvision's parameter names; other torchvision models differ."""
    from dino_fast.model.convnet import resolve_convnet
    lib, name = resolve_convnet(arch)
    return lib == "timm" or name.startswith(("resnet", "wide_resnet"))


def export_checkpoint(checkpoint: str, output: str, fmt: str = "reference", checkpoint_key: str = "teacher", *,
                      timm_img_size: int | None = None, **load_kwargs) -> BackboneConfig:
    """Write `checkpoint`'s backbone to `output` in `fmt`; returns its config."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if os.path.abspath(output) == os.path.abspath(checkpoint):
        raise ValueError(f"--output {output} is the input checkpoint; choose another file name")
    model, cfg = load_with_config(checkpoint, checkpoint_key, **load_kwargs)
    if fmt == "safetensors":
        save_safetensors(_plain_state_dict(model), cfg, output,
                         {"source": os.path.basename(checkpoint), "checkpoint_key": checkpoint_key})
    else:
        atomic_torch_save(layout_state_dict(model, cfg, fmt, timm_img_size), output)
    return cfg
