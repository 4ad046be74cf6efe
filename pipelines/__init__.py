"""dino_fast.pipelines: DINO multi-crop data loading (DALI on the GPU, torch reference)."""
from .config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from .images import BadImageError, decode_rgb
from .loader import MultiCropLoader, dali_available
from .reference import CropParams, DataAugmentationDINO
from .sources import ArraySource, FileSource, Source, SourceError, TarSource, open_source

__all__ = ["AugmentConfig", "ArraySource", "BadImageError", "CropParams", "DataAugmentationDINO",
           "FileSource", "IMAGENET_MEAN", "IMAGENET_STD", "MultiCropLoader", "Source", "SourceError",
           "TarSource", "dali_available", "decode_rgb", "open_source"]
