"""DINO ViT backbones (with the DINOv2 / DINOv3 options), convnets, projection head and packed
multi-crop wrapper.

Names are imported lazily (dino_fast._lazy_exports): `dino_fast.model.registry` (the
architecture table the train config checks names against) loads without torch, so
`dino-fast train --help` stays instant.
"""
from dino_fast import _lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "BACKENDS": "dino_fast.model.attention", "resolve_backend": "dino_fast.model.attention",
    "BackboneConfig": "dino_fast.model.backbone_config", "config_from_model": "dino_fast.model.backbone_config",
    "load_reference_checkpoint": "dino_fast.model.checkpoint",
    "load_reference_state_dict": "dino_fast.model.checkpoint", "strip_prefixes": "dino_fast.model.checkpoint",
    "dino_step_flops_per_image": "dino_fast.model.flops", "flops_per_image": "dino_fast.model.flops",
    "vit_forward_flops": "dino_fast.model.flops",
    "DINOHead": "dino_fast.model.head", "WeightNormLinear": "dino_fast.model.head",
    "PackedLayout": "dino_fast.model.layout",
    **{name: "dino_fast.model.registry" for name in ("VIT_ARCHS", "build_backbone", "build_vit", "vit_7b",
                                                     "vit_giant2", "vit_huge2", "vit_large", "vit_so400m")},
    **{name: "dino_fast.model.vit" for name in ("VisionTransformer", "vit_base", "vit_small", "vit_tiny")},
    "MultiCropWrapper": "dino_fast.model.wrapper",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
