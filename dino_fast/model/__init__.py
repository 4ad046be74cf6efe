"""DINO ViT backbone, projection head and packed multi-crop wrapper."""
from dino_fast.model.attention import BACKENDS, resolve_backend
from dino_fast.model.checkpoint import load_reference_checkpoint, load_reference_state_dict, strip_prefixes
from dino_fast.model.flops import dino_step_flops_per_image, flops_per_image, vit_forward_flops
from dino_fast.model.head import DINOHead, WeightNormLinear
from dino_fast.model.layout import PackedLayout
from dino_fast.model.vit import VisionTransformer, vit_base, vit_small, vit_tiny
from dino_fast.model.wrapper import MultiCropWrapper

__all__ = ["BACKENDS", "DINOHead", "MultiCropWrapper", "PackedLayout", "VisionTransformer", "WeightNormLinear",
           "dino_step_flops_per_image", "flops_per_image", "load_reference_checkpoint", "load_reference_state_dict",
           "resolve_backend", "strip_prefixes", "vit_base", "vit_forward_flops", "vit_small", "vit_tiny"]
