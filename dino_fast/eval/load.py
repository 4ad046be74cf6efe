"""`dino_fast.load(path)`: the backbone of any checkpoint dino-fast reads.

Containers (detected from the content, not the file name):
- full training checkpoints, dino-fast's or the reference main_dino.py's:
  {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", ...} with
  keys prefixed `module.` / `backbone.` / `head.` (the head is dropped);
  DINOv2 / DINOv3 teacher checkpoints ({"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}},
  or flat "teacher.backbone.*" keys);
- a plain backbone state dict: the reference DINO's, the official DINOv2 / DINOv3 ones, timm's
  VisionTransformer (DINO, DINOv2, DINOv2 reg4) or Eva (DINOv3) models (dino_fast.model.formats),
  or a torchvision / timm convnet's;
- safetensors with the model config in the metadata (`--format safetensors`);
- a torch.distributed.checkpoint folder (sharded training checkpoint).

The architecture comes from the safetensors metadata, else the tensors and the source layout's
conventions (dino_fast.model.backbone_config), refined by a dino-fast checkpoint's `args`;
`num_heads=` / `arch=` override or check. A convnet is named by the checkpoint's `args.arch`,
by `arch=`, or recognised (torchvision ResNets). The returned backbone's `forward(x)` is the CLS
token after the final norm (a ViT) or the pooled features (a convnet).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import asdict

import torch
import torch.nn as nn

from dino_fast.model.backbone_config import BackboneConfig, CheckpointError, infer_from_state_dict

log = logging.getLogger(__name__)

SAFETENSORS_FORMAT = "dino_fast.backbone.v1"
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "backbone.")
_HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")
# what a dino-fast training config fixes that the tensors cannot tell (TrainConfig field names)
_TRAIN_ONLY_FIELDS = ("pos_interp", "norm_eps", "rope_normalize_coords", "rope_base", "rope_min_period",
                      "rope_max_period")


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
        if k == "backbone_config":  # dino-fast's exact backbone record, kept whole
            continue
        if isinstance(v, dict):
            flat.update({kk: vv for kk, vv in v.items() if kk not in flat})
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            flat.update({kk: vv for kk, vv in asdict(v).items() if kk not in flat})
    flat.update({k: v for k, v in args.items() if not isinstance(v, dict)})
    if isinstance(args.get("backbone_config"), dict):
        flat["backbone_config"] = args["backbone_config"]
    return flat


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_wrappers(state_dict: dict) -> dict:
    from dino_fast.model.checkpoint import strip_prefixes as strip
    sd = strip(state_dict, _PREFIXES)
    return {k.replace("._orig_mod.", ".").replace("._checkpoint_wrapped_module.", "."): v for k, v in sd.items()}


def strip_prefixes(state_dict: dict) -> dict:
    """Drop wrapper prefixes (`module.`, `_orig_mod.`, FSDP, `backbone.`) and
    the projection heads (`head.*`, DINOv2's `dino_head.*` / `ibot_head.*`), as the reference's loaders do."""
    return {k: v for k, v in _strip_wrappers(state_dict).items() if not k.startswith(_HEAD_PREFIXES)}


def _network(obj, checkpoint_key: str, path: str) -> tuple[dict, dict]:
    """(the tensors of one network, unstripped, checkpoint args) of any container."""
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
                raise CheckpointError(f"{path}: not a ViT checkpoint (nor a convnet one): top-level keys {sorted(obj)[:8]}; "
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
    # DINOv2 / DINOv3 SSLMetaArch state dicts: "student.backbone.*", "teacher.backbone.*" in one dict
    if sd and all(k.startswith(("student.", "teacher.", "gram_teacher.")) for k in sd):
        pre = checkpoint_key + "."
        if not any(k.startswith(pre) for k in sd):
            raise CheckpointError(f"{path}: has no {checkpoint_key!r} weights; pass --checkpoint_key student")
        sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return sd, args


def backbone_state_dict(obj, checkpoint_key: str = "teacher", path: str = "checkpoint") -> tuple[dict, dict, dict]:
    """(backbone state dict in dino-fast's layout, checkpoint args, config hints of the source
    layout) from the raw content of any supported checkpoint."""
    from dino_fast.model.formats import to_internal
    sd, args = _network(obj, checkpoint_key, path)
    sd = strip_prefixes(sd)
    if _is_convnet_state_dict(sd):
        return sd, args, {"kind": "convnet", "layout": "convnet"}
    sd, hints = to_internal(sd, path)
    return sd, args, hints


def head_state_dict(obj, checkpoint_key: str = "teacher", path: str = "checkpoint") -> dict | None:
    """The DINO projection head of a training checkpoint (`head.*`, DINOv2's `dino_head.*`), or None."""
    try:
        sd, _ = _network(obj, checkpoint_key, path)
    except CheckpointError:
        return None
    sd = _strip_wrappers(sd)
    for pre in ("head.", "dino_head."):
        head = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        if head and any(k.startswith("last_layer.") for k in head):
            return head
    return None


def _is_convnet_state_dict(sd: dict) -> bool:
    return "patch_embed.proj.weight" not in sd and "cls_token" not in sd and any(v.dim() == 4 for v in sd.values())


def _convnet_config(sd: dict, args: dict, arch: str | None, path: str) -> BackboneConfig:
    from dino_fast.model.convnet import detect_resnet
    from dino_fast.model.registry import is_vit
    name = arch or (args.get("arch") if args.get("arch") and not is_vit(args["arch"]) else None) or detect_resnet(sd)
    if not name:
        raise CheckpointError(f"{path}: a convnet state dict without its architecture name; pass --arch "
                              "(a torchvision or timm model name, e.g. resnet50, convnext_small)")
    return BackboneConfig(kind="convnet", arch=name, patch_size=0, depth=0, num_heads=0, embed_dim=0,
                          layout="convnet")


def _is_train_config(args: dict) -> bool:
    """A dino-fast TrainConfig (it records what the tensors cannot tell)."""
    return "pos_interp" in args and "num_register_tokens" in args


def infer_config(sd: dict, args: dict | None = None, meta: dict | None = None, *, path: str = "checkpoint",
                 arch: str | None = None, patch_size: int | None = None, num_heads: int | None = None,
                 hints: dict | None = None) -> BackboneConfig:
    """Backbone config from safetensors metadata, tensors + source-layout hints and checkpoint
    args; user overrides (arch, patch_size, num_heads) are checked against the weights."""
    from dino_fast.model.registry import VIT_ARCHS, is_vit
    args, meta, hints = args or {}, meta or {}, dict(hints or {})
    if meta.get("config"):
        cfg = BackboneConfig.from_dict(json.loads(meta["config"]))
    elif isinstance(args.get("backbone_config"), dict):  # a dino-fast training checkpoint
        cfg = BackboneConfig.from_dict(args["backbone_config"])
    elif hints.get("kind") == "convnet":
        if arch and is_vit(arch):
            raise CheckpointError(f"{path}: holds a convnet, not --arch {arch}; drop --arch or name the convnet")
        return _convnet_config(sd, args, arch, path)
    else:
        heads = num_heads or args.get("num_heads")
        cfg = infer_from_state_dict(sd, hints, heads, path)
        if _is_train_config(args):
            from dino_fast.model.backbone_config import train_fields
            fixed = train_fields(args)
            cfg.__dict__.update({k: v for k, v in fixed.items() if k in _TRAIN_ONLY_FIELDS or k == "mask_k_bias"})
        if is_vit(str(args.get("arch"))) and VIT_ARCHS[args["arch"]].embed_dim == cfg.embed_dim:
            cfg.arch = args["arch"]
    if num_heads is not None and num_heads != cfg.num_heads:
        cfg.num_heads = int(num_heads)
    if cfg.kind == "vit" and cfg.embed_dim % cfg.num_heads:
        raise CheckpointError(f"{path}: embed_dim {cfg.embed_dim} is not divisible by {cfg.num_heads} heads; "
                              "pass the right num_heads")
    if patch_size is not None and cfg.kind == "vit" and int(patch_size) != cfg.patch_size:
        raise CheckpointError(f"{path}: the checkpoint has patch size {cfg.patch_size}, not --patch_size "
                              f"{patch_size}; drop --patch_size (it is read from the checkpoint)")
    if arch:
        if cfg.kind == "convnet":
            if arch != cfg.arch:
                raise CheckpointError(f"{path}: the checkpoint is a {cfg.arch}, not --arch {arch}; drop --arch")
        elif not is_vit(arch):
            raise CheckpointError(f"{path}: holds a ViT (embed_dim {cfg.embed_dim}), not --arch {arch}; drop --arch")
        elif VIT_ARCHS[arch].embed_dim != cfg.embed_dim:
            raise CheckpointError(f"{path}: the checkpoint is a ViT with embed_dim {cfg.embed_dim} "
                                  f"({cfg.arch or 'non-standard'}), not --arch {arch} (embed_dim "
                                  f"{VIT_ARCHS[arch].embed_dim}); drop --arch (it is read from the checkpoint)")
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


def complete_state_dict(model: nn.Module, sd: dict, cfg: BackboneConfig) -> dict:
    """Fill what a layout does not save: RoPE periods (timm's Eva recomputes them); drop a
    convnet's classifier (the backbone has none)."""
    own = model.state_dict()
    sd = dict(sd)
    if cfg.kind == "vit" and cfg.pos_embed == "rope" and "rope_embed.periods" not in sd:
        sd["rope_embed.periods"] = own["rope_embed.periods"].clone()
    if cfg.kind == "convnet":
        dropped = [k for k in sd if k not in own and k.split(".")[0] in ("fc", "classifier", "head", "heads")]
        for k in dropped:
            sd.pop(k)
        if dropped:
            log.info("dropping the classifier %s of the convnet checkpoint", dropped)
    return sd


def load_with_config(path: str, checkpoint_key: str = "teacher", *, arch: str | None = None,
                     patch_size: int | None = None, num_heads: int | None = None, attention: str = "auto",
                     device: torch.device | str = "cpu",
                     pos_interp: str | None = None) -> tuple[nn.Module, BackboneConfig]:
    """(backbone in eval mode on `device`, its config) from any checkpoint. pos_interp overrides
    how a learned position embedding is resized ("reference" | "antialias" | "size")."""
    obj, meta = read_checkpoint(path)
    sd, args, hints = backbone_state_dict(obj, checkpoint_key, str(path))
    cfg = infer_config(sd, args, meta, path=str(path), arch=arch, patch_size=patch_size, num_heads=num_heads,
                       hints=hints)
    if pos_interp is not None:
        cfg.pos_interp = pos_interp
    model = cfg.build(attention=attention)
    if cfg.kind == "convnet":
        cfg.embed_dim = model.embed_dim
    load_state_dict_strict(model, complete_state_dict(model, sd, cfg), str(path))
    log.info("%s: loaded %s (%s weights, %s layout)", path, cfg.name, checkpoint_key, cfg.layout)
    return model.to(device).eval(), cfg


def load(path: str, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """The backbone (eval mode) of a dino-fast, reference DINO, DINOv2 or DINOv3 checkpoint, a
    timm ViT / Eva or torchvision / timm convnet state dict, or an exported safetensors file.
    kwargs: arch, patch_size, num_heads (checked against the weights), attention backend,
    device, pos_interp."""
    return load_with_config(path, checkpoint_key, **kwargs)[0]


__all__ = ["BackboneConfig", "CheckpointError", "backbone_state_dict", "head_state_dict", "infer_config", "load",
           "load_state_dict_strict", "load_with_config", "read_checkpoint", "strip_prefixes"]
