"""Convnet backbones, as the reference trains them (`--arch resnet50`): any torchvision or timm
classification model by name, classifier removed, output the pooled features (B, F).

`resnet50` etc. come from torchvision (the reference's source; the released DINO ResNet-50
weights are a torchvision state dict); a name torchvision does not have, or `timm:<name>`, comes
from timm (`pretrained=False, num_classes=0`). The backbone keeps the library's own parameter
names (no wrapper prefix), so reference and library checkpoints load strictly.

Multi-crop: the convnet runs once per group of equal-resolution crops (the reference
MultiCropWrapper loop, no packing); with more than one process its BatchNorm layers become
SyncBatchNorm (`convert_sync_batchnorm`), as the reference does.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def _torchvision_names() -> set[str]:
    import torchvision
    return set(torchvision.models.list_models(module=torchvision.models))


def resolve_convnet(name: str) -> tuple[str, str]:
    """(library, model name) of a convnet arch: torchvision first, then timm ("timm:" forces timm)."""
    if name.startswith("timm:"):
        lib, model = "timm", name[len("timm:"):]
    elif name in _torchvision_names():
        lib, model = "torchvision", name
    else:
        lib, model = "timm", name
    if lib == "timm":
        import timm
        if not timm.is_model(model):
            raise ValueError(f"--arch {name!r} is neither a dino-fast ViT, a torchvision model nor a timm model "
                             "(e.g. vit_small, resnet50, convnext_small, timm:resnet50)")
    return lib, model


def _drop_classifier_torchvision(model: nn.Module) -> int:
    """Replace the last Linear (the classifier) and a Dropout right before it by Identity;
    returns the feature width."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no Linear classifier to remove")
    name, last = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential):
        idx = int(attr)
        parent[idx] = nn.Identity()
        if idx > 0 and isinstance(parent[idx - 1], nn.Dropout):
            parent[idx - 1] = nn.Identity()
    else:
        setattr(parent, attr, nn.Identity())
    return last.in_features


def build_convnet(name: str, drop_path_rate: float = 0.0) -> nn.Module:
    """The convnet `name` without its classifier (random init). drop_path_rate goes to models
    that take one (timm's drop_path_rate, torchvision's stochastic_depth_prob); others ignore it.
    Attributes set: embed_dim / num_features (output width), arch, dino_headless."""
    lib, model_name = resolve_convnet(name)
    if lib == "torchvision":
        import torchvision
        kw = {"stochastic_depth_prob": drop_path_rate} if drop_path_rate else {}
        try:
            model = torchvision.models.get_model(model_name, weights=None, **kw)
        except TypeError:
            log.info("%s takes no stochastic depth; drop_path_rate %.2f ignored", model_name, drop_path_rate)
            model = torchvision.models.get_model(model_name, weights=None)
        width = _drop_classifier_torchvision(model)
    else:
        import timm
        kw = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, **kw)
        except TypeError:
            log.info("%s takes no drop_path_rate; %.2f ignored", model_name, drop_path_rate)
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        width = model.num_features
    model.embed_dim = model.num_features = int(width)
    model.arch = name
    model.dino_headless = True  # MultiCropWrapper must not reset its fc / head (timm's head holds the norm)
    return model


def is_convnet(model: nn.Module) -> bool:
    return bool(getattr(model, "dino_headless", False)) and not hasattr(model, "blocks")


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fsdp_units(backbone: nn.Module) -> list[nn.Module]:
    """Modules to fully_shard before the root: a ViT's blocks, a convnet's top-level children
    that hold parameters (ResNet: conv1, bn1, layer1..4)."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [m for m in backbone.children() if any(True for _ in m.parameters())]


@functools.lru_cache(maxsize=64)
def convnet_forward_flops(name: str, h: int, w: int) -> float:
    """Forward FLOPs of one (3, h, w) image, counted by torch.utils.flop_counter.FlopCounterMode
    on a meta-device copy (no memory, no compute; GEMMs and convolutions, 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_convnet(name)
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, h, w, device="meta"))
    return float(counter.get_total_flops())


# released ResNets, detected from a torchvision state dict: (bottleneck, blocks per stage, width) -> name
_RESNETS = {(False, (2, 2, 2, 2), 64): "resnet18", (False, (3, 4, 6, 3), 64): "resnet34",
            (True, (3, 4, 6, 3), 64): "resnet50", (True, (3, 4, 23, 3), 64): "resnet101",
            (True, (3, 8, 36, 3), 64): "resnet152", (True, (3, 4, 6, 3), 128): "wide_resnet50_2",
            (True, (3, 4, 23, 3), 128): "wide_resnet101_2"}


def detect_resnet(sd: dict) -> str | None:
    """The torchvision ResNet a state dict belongs to (the reference's released DINO ResNet-50
    is one), or None."""
    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    counts = tuple(1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    width = int(sd["layer1.0.conv1.weight"].shape[0]) if bottleneck else 64
    if bottleneck and sd["layer1.0.conv2.weight"].shape[1] != width:
        return None  # grouped convolutions: a ResNeXt, pass --arch
    return _RESNETS.get((bottleneck, counts, width))
