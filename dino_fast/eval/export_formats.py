"""The names of `dino-fast export --format` (no torch import: the command's --help needs them)."""
FORMATS = ("reference", "dinov2", "dinov3", "timm", "safetensors")
