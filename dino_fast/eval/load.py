"""`dino_fast.load(path)`: the ViT backbone of any checkpoint dino-fast reads.

Formats (detected from the content, not the file name):
- full training checkpoints, dino-fast's or the reference main_dino.py's:
  {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", ...} with
  keys prefixed `module.` / `backbone.` / `head.` (the head is dropped);
- the reference backbone-only format (what its hubconf models load): a plain
  state dict with the reference's parameter names;
- a timm state dict (`dino-fast export --format timm`);
- safetensors with the model config in the metadata (`--format safetensors`);
- a torch.distributed.checkpoint folder (sharded training checkpoint).

The architecture comes from the safetensors metadata, else the checkpoint's
`args`, else the tensor shapes: embed_dim from pos_embed, depth from the block
count, patch size from patch_embed.proj.weight, MLP ratio from mlp.fc1, heads
from the standard ViT table (tiny 3, small 6, base 12) or `num_heads=`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

SAFETENSORS_FORMAT = "dino_fast.backbone.v1"
# embed_dim -> (arch name, heads) of the standard DINO ViTs
STANDARD_ARCHS = {192: ("vit_tiny", 3), 384: ("vit_small", 6), 768: ("vit_base", 12), 1024: ("vit_large", 16)}
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "backbone.")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model."""


@dataclass
class BackboneConfig:
    """Everything needed to rebuild a DINO ViT backbone."""
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: int = 224
    arch: str | None = None

    def build(self, attention: str = "auto") -> nn.Module:
        from dino_fast.model import VisionTransformer
        return VisionTransformer(
            img_size=[self.img_size], patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), attention=attention)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def name(self) -> str:
        base = self.arch or f"vit_d{self.embed_dim}x{self.depth}"
        return f"{base}/{self.patch_size}"


# ---------------------------------------------------------------- reading files
def _is_safetensors(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < os.path.getsize(path) and head[8:9] == b"{"


def _torch_load(path: str):
    """torch.load on the CPU: weights-only first (argparse.Namespace allowed,
    as in the reference's checkpoints), the full unpickler as a fallback for
    trusted files carrying other Python objects."""
    def unreadable(e):
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}). Pass a .pth/.pt training checkpoint, an exported "
                               "backbone or a .safetensors file; a truncated copy fails like this too")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of weights_only mode come in several types
        if "Unsupported global" not in str(e) and "Unsupported class" not in str(e):
            raise unreadable(e) from e
    log.warning("%s: holds Python objects beyond tensors; loading it with the full unpickler "
                "(only do this for files you trust)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise unreadable(e) from e


def _read_dcp(path: str) -> dict:
    """A torch.distributed.checkpoint folder as one state dict (on the CPU)."""
    import tempfile
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ckpt.pt")
        dcp_to_torch_save(path, out)
        return _torch_load(out)


def read_checkpoint(path: str) -> tuple[object, dict]:
    """The raw content of a checkpoint and its safetensors metadata ({} else)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file. Pass --checkpoint with the path of a "
                              "dino-fast or reference training checkpoint (checkpoint.pth) or an exported backbone")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, ".metadata")):
            return _read_dcp(path), {}
        for name in ("checkpoint.pth", "checkpoint.pt", "model.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                return read_checkpoint(os.path.join(path, name))
        raise CheckpointError(f"{path}: a folder without a checkpoint (no checkpoint.pth, model.safetensors "
                              "or torch.distributed.checkpoint .metadata); pass the checkpoint file itself")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted copy?); use a complete checkpoint")
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file, safe_open
        except ImportError as e:
            raise CheckpointError(f"{path}: is a safetensors file but the safetensors package is missing: "
                                  "pip install 'dino-fast[export]'") from e
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(path, device="cpu"), meta
    return _torch_load(path), {}


# ---------------------------------------------------------------- state dicts
def _args_dict(args) -> dict:
    """The training arguments of a checkpoint as a flat dict (Namespace,
    dataclass or dict, nested one level: {"model": {...}})."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif dataclasses.is_dataclass(args):
        args = asdict(args)
    if not isinstance(args, dict):
        return {}
    flat = {}
    for k, v in args.items():
        if isinstance(v, dict):
            flat.update({kk: vv for kk, vv in v.items() if kk not in flat})
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            flat.update({kk: vv for kk, vv in asdict(v).items() if kk not in flat})
    flat.update({k: v for k, v in args.items() if not isinstance(v, dict)})
    return flat


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state_dict: dict) -> dict:
    """Drop wrapper prefixes (`module.`, `_orig_mod.`, FSDP, `backbone.`) and
    the DINO projection head (`head.*`), as the reference's loaders do."""
    from dino_fast.model.checkpoint import strip_prefixes as strip
    sd = strip(state_dict, _PREFIXES)
    return {k.replace("._orig_mod.", ".").replace("._checkpoint_wrapped_module.", "."): v
            for k, v in sd.items() if not k.startswith("head.")}


def _from_timm(state_dict: dict, path: str) -> dict:
    """timm -> reference names (the model's timm interop: the key sets are
    identical for a token-pool DINO ViT; timm-only layers are refused)."""
    from dino_fast.model.timm_interop import from_timm_state_dict
    try:
        return from_timm_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def backbone_state_dict(obj, checkpoint_key: str = "teacher", path: str = "checkpoint") -> tuple[dict, dict]:
    """(backbone state dict with reference names, checkpoint args) from the
    raw content of any supported checkpoint."""
    args = {}
    if isinstance(obj, dict) and not _is_state_dict(obj):
        args = _args_dict(obj.get("args", obj.get("config")))
        if checkpoint_key in obj and isinstance(obj[checkpoint_key], dict):
            sd = obj[checkpoint_key]
        elif any(k in obj for k in ("student", "teacher")):
            have = [k for k in ("student", "teacher") if k in obj]
            raise CheckpointError(f"{path}: has no {checkpoint_key!r} weights (it holds {have}); "
                                  f"pass --checkpoint_key {have[0]}")
        else:
            for key in ("state_dict", "model", "backbone"):
                if isinstance(obj.get(key), dict):
                    sd = obj[key]
                    break
            else:
                raise CheckpointError(f"{path}: not a ViT checkpoint: top-level keys {sorted(obj)[:8]}; "
                                      f"expected 'teacher'/'student' (training checkpoint) or a backbone state dict")
        # a model wrapped once more (e.g. {"teacher": {"model": {...}}})
        if not _is_state_dict(sd) and isinstance(sd, dict) and len(sd) == 1:
            sd = next(iter(sd.values()))
    elif _is_state_dict(obj):
        sd = obj
    else:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict; "
                              "save the model's state_dict() (or export it with `dino-fast export`)")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return _from_timm(strip_prefixes(sd), path), args


def infer_config(sd: dict, args: dict | None = None, meta: dict | None = None, *, path: str = "checkpoint",
                 arch: str | None = None, patch_size: int | None = None,
                 num_heads: int | None = None) -> BackboneConfig:
    """Backbone config from safetensors metadata, checkpoint args and shapes;
    user overrides (arch, patch_size, num_heads) are checked against shapes."""
    args, meta = args or {}, meta or {}
    if meta.get("config"):
        cfg = BackboneConfig.from_dict(json.loads(meta["config"]))
    else:
        missing = [k for k in ("pos_embed", "patch_embed.proj.weight") if k not in sd]
        if missing:
            raise CheckpointError(f"{path}: no ViT backbone weights (missing {missing}; first keys: "
                                  f"{sorted(sd)[:5]}). Expected a DINO ViT checkpoint")
        w = sd["patch_embed.proj.weight"]              # (D, 3, p, p)
        D = sd["pos_embed"].shape[-1]
        depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        npatch = sd["pos_embed"].shape[1] - 1
        fc1 = sd.get("blocks.0.mlp.fc1.weight")
        std_arch, std_heads = STANDARD_ARCHS.get(D, (None, None))
        heads = num_heads or args.get("num_heads") or std_heads or max(1, D // 64)
        cfg = BackboneConfig(
            patch_size=int(w.shape[-1]), embed_dim=int(D), depth=depth, num_heads=int(heads),
            mlp_ratio=(fc1.shape[0] / D) if fc1 is not None else 4.0,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            img_size=int(round(math.sqrt(npatch))) * int(w.shape[-1]),
            arch=args.get("arch") if args.get("arch") in ("vit_tiny", "vit_small", "vit_base") else std_arch)
        if num_heads is None and not args.get("num_heads") and std_heads is None:
            log.warning("%s: embed_dim %d is not a standard ViT; assuming %d heads (pass num_heads= to override)",
                        path, D, cfg.num_heads)
    if num_heads is not None and num_heads != cfg.num_heads:
        cfg.num_heads = int(num_heads)
    if cfg.embed_dim % cfg.num_heads:
        raise CheckpointError(f"{path}: embed_dim {cfg.embed_dim} is not divisible by {cfg.num_heads} heads; "
                              "pass the right num_heads")
    if patch_size is not None and int(patch_size) != cfg.patch_size:
        raise CheckpointError(f"{path}: the checkpoint has patch size {cfg.patch_size}, not --patch_size "
                              f"{patch_size}; drop --patch_size (it is read from the checkpoint)")
    if arch:
        want = {v[0]: k for k, v in STANDARD_ARCHS.items()}.get(arch)
        if want is None:
            raise CheckpointError(f"--arch {arch!r} is not a ViT dino-fast builds (vit_tiny, vit_small, vit_base)")
        if want != cfg.embed_dim:
            raise CheckpointError(f"{path}: the checkpoint is a ViT with embed_dim {cfg.embed_dim} "
                                  f"({cfg.arch or 'non-standard'}), not --arch {arch} (embed_dim {want}); "
                                  "drop --arch (it is read from the checkpoint)")
    return cfg


def load_state_dict_strict(model: nn.Module, sd: dict, path: str = "checkpoint") -> None:
    """load_state_dict that names what is missing, unexpected or mis-shaped."""
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append(f"shape mismatch: {bad[:3]}")
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}")
        raise CheckpointError(f"{path}: does not match the model it describes ({'; '.join(parts)}). "
                              "Check --checkpoint_key / --arch / --patch_size, or re-export the checkpoint")
    model.load_state_dict(sd, strict=True)


def load_with_config(path: str, checkpoint_key: str = "teacher", *, arch: str | None = None,
                     patch_size: int | None = None, num_heads: int | None = None, attention: str = "auto",
                     device: torch.device | str = "cpu") -> tuple[nn.Module, BackboneConfig]:
    """(backbone in eval mode on `device`, its config) from any checkpoint."""
    obj, meta = read_checkpoint(path)
    sd, args = backbone_state_dict(obj, checkpoint_key, str(path))
    cfg = infer_config(sd, args, meta, path=str(path), arch=arch, patch_size=patch_size, num_heads=num_heads)
    model = cfg.build(attention=attention)
    load_state_dict_strict(model, sd, str(path))
    log.info("%s: loaded %s (%s weights)", path, cfg.name, checkpoint_key)
    return model.to(device).eval(), cfg


def load(path: str, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """The ViT backbone (eval mode) of a dino-fast or reference training
    checkpoint, a reference/timm backbone state dict or an exported
    safetensors file. kwargs: arch, patch_size, num_heads (checked against
    the weights), attention backend, device."""
    return load_with_config(path, checkpoint_key, **kwargs)[0]


__all__ = ["BackboneConfig", "CheckpointError", "backbone_state_dict", "infer_config", "load",
           "load_state_dict_strict", "load_with_config", "read_checkpoint", "strip_prefixes"]
