"""DINO ViT backbones (with the DINOv2 / DINOv3 options), convnets, projection head and packed
multi-crop wrapper."""
from dino_fast.model.attention import BACKENDS, resolve_backend
from dino_fast.model.backbone_config import BackboneConfig, config_from_model
from dino_fast.model.checkpoint import load_reference_checkpoint, load_reference_state_dict, strip_prefixes
from dino_fast.model.flops import dino_step_flops_per_image, flops_per_image, vit_forward_flops
from dino_fast.model.head import DINOHead, WeightNormLinear
from dino_fast.model.layout import PackedLayout
from dino_fast.model.registry import (VIT_ARCHS, build_backbone, build_vit, vit_7b, vit_giant2, vit_huge2, vit_large,
                                      vit_so400m)
from dino_fast.model.vit import VisionTransformer, vit_base, vit_small, vit_tiny
from dino_fast.model.wrapper import MultiCropWrapper

__all__ = ["BACKENDS", "BackboneConfig", "DINOHead", "MultiCropWrapper", "PackedLayout", "VIT_ARCHS",
           "VisionTransformer", "WeightNormLinear", "build_backbone", "build_vit", "config_from_model",
           "dino_step_flops_per_image", "flops_per_image", "load_reference_checkpoint", "load_reference_state_dict",
           "resolve_backend", "strip_prefixes", "vit_7b", "vit_base", "vit_forward_flops", "vit_giant2", "vit_huge2",
           "vit_large", "vit_small", "vit_so400m", "vit_tiny"]
