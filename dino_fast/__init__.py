"""dino-fast: DINO self-distillation pretraining of Vision Transformers, fast.

Public names are imported lazily so that `from dino_fast import DINOLoss`
pulls in only the loss, not the model, the pipelines or DALI.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "DINOLoss": "dino_fast.losses.dino_loss",
    "dino_loss": "dino_fast.kernels.dino_loss",
    "ema_update_": "dino_fast.kernels.ema",
    "MomentumSchedule": "dino_fast.schedules",
    "cosine_scheduler": "dino_fast.schedules",
    "VisionTransformer": "dino_fast.model",
    "DINOHead": "dino_fast.model",
    "MultiCropWrapper": "dino_fast.model",
    "vit_tiny": "dino_fast.model",
    "vit_small": "dino_fast.model",
    "vit_base": "dino_fast.model",
    "vit_large": "dino_fast.model",
    "vit_giant2": "dino_fast.model",
    "vit_7b": "dino_fast.model",
    "build_backbone": "dino_fast.model",
    "load": "dino_fast.eval.load",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """(__getattr__, __dir__) for a package whose public names live in exports[name] (a module),
    each imported on first use (PEP 562). Here, so that every package can use it and importing
    `dino_fast` imports nothing else (kernels/ import with the rest of dino_fast absent)."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return list(namespace.get("__all__", sorted(exports)))
    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
