"""Load checkpoints written by the reference DINO code (facebookresearch/dino).

Layouts handled:
- training checkpoint (main_dino.py `checkpoint.pth`): {"student": {...},
  "teacher": {...}, "optimizer", "epoch", "args", "dino_loss"}; the student is
  DDP-wrapped, so its keys read `module.backbone.<vit key>` / `module.head.<head
  key>`; the teacher's read `backbone.*` / `head.*` (`module.` too when it had BN);
- released backbone weights (`dino_vitbase8_pretrain.pth`): bare ViT keys;
- a full MultiCropWrapper state dict (`backbone.*`, `head.*`).
Our own names match the reference one to one, so loading is prefix stripping
plus strict=True.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor],
                   prefixes: tuple[str, ...] = _WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove any of `prefixes` from the start of every key (repeatedly:
    `module._orig_mod.x` -> `x`)."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _read(source) -> Mapping:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: pass the path of a .pth file "
                                f"written by the reference main_dino.py or by dino-fast")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt / truncated file
        raise ValueError(f"checkpoint {path!r} could not be read ({type(e).__name__}: {e}); "
                         f"is the file complete?") from e


def load_reference_state_dict(source, key: str | None = "teacher", part: str = "backbone") -> dict:
    """The state dict of `part` ("backbone", "head" or "wrapper") from a reference
    checkpoint file (or an already loaded dict), prefixes stripped.

    key: which network of a training checkpoint ("teacher", as the reference
    evaluation scripts, or "student"); ignored when the file is a bare state dict."""
    if part not in ("backbone", "head", "wrapper"):
        raise ValueError(f"part={part!r}: choose 'backbone', 'head' or 'wrapper'")
    where = source if not isinstance(source, Mapping) else "<state dict>"
    ckpt = _read(source)
    if key is not None and key in ckpt and isinstance(ckpt[key], Mapping):
        sd = ckpt[key]
    elif any(isinstance(v, Mapping) for v in ckpt.values()) and not any(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise KeyError(f"{where}: no {key!r} entry among {sorted(ckpt)}; pass key='student' or 'teacher'")
    else:
        sd = ckpt
    sd = strip_prefixes(sd)
    has_backbone = any(k.startswith("backbone.") for k in sd)
    if part == "wrapper":
        return sd
    if part == "backbone":
        if has_backbone:
            return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        return {k: v for k, v in sd.items() if not k.startswith("head.")}  # bare backbone file
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    if not head:
        raise KeyError(f"{where}: no 'head.*' keys; this file holds a backbone only")
    return head


def load_reference_checkpoint(model: nn.Module, source, key: str | None = "teacher", strict: bool = True):
    """Load a reference checkpoint into a VisionTransformer, DINOHead or
    MultiCropWrapper (the part is chosen by the model's type)."""
    from dino_fast.model.head import DINOHead
    from dino_fast.model.wrapper import MultiCropWrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile'd
    part = "wrapper" if isinstance(model, MultiCropWrapper) else "head" if isinstance(model, DINOHead) else "backbone"
    sd = load_reference_state_dict(source, key=key, part=part)
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            where = source if not isinstance(source, Mapping) else "<state dict>"
            raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)} but the model's is "
                             f"{tuple(own[k].shape)}: build the model with the checkpoint's architecture "
                             f"(arch / patch_size / out_dim)")
    return model.load_state_dict(sd, strict=strict)
