"""Arguments and helpers shared by the evaluation subcommands (knn, linear,
attention, export)."""
from __future__ import annotations

import argparse
import sys


def __getattr__(name: str):
    # USER_ERRORS is built on first use, so `dino-fast <command> --help` does not import torch
    if name == "USER_ERRORS":
        from dino_fast.eval.load import CheckpointError
        # Errors that are the user's input, reported in one line (no traceback).
        return (CheckpointError, FileNotFoundError, NotADirectoryError, ValueError, KeyError, ImportError)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint")
    g.add_argument("--checkpoint", required=True,
                   help="training checkpoint (dino-fast or reference main_dino.py checkpoint.pth), an exported "
                        "backbone (reference / timm .pth) or a .safetensors export")
    g.add_argument("--checkpoint_key", default="teacher", choices=("teacher", "student"),
                   help="which network of a training checkpoint (default: teacher, as the paper)")
    g.add_argument("--arch", default=None,
                   help="a ViT (vit_small, vit_large, ...) is checked against the checkpoint (read from it when "
                        "omitted); a convnet (resnet50, convnext_small, timm:<name>) names the architecture of a "
                        "bare convnet state dict")
    g.add_argument("--patch_size", default=None, type=int,
                   help="checked against the checkpoint (read from it when omitted)")
    g.add_argument("--attention", default="auto", help="attention backend (auto, sdpa, math, ...)")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", required=True,
                   help="folder with train/ and val/ ImageFolders (one subfolder per class), or 'demo': the "
                        "demo images shipped in the package, split as the demo's k-NN (train / held-out)")
    g.add_argument("--batch_size", default=128, type=int, help="images per forward pass")
    g.add_argument("--num_workers", default=8, type=int, help="data loading processes")
    g.add_argument("--resize", default=None, type=int,
                   help="shorter side after Resize (bicubic; default and reference: 256)")
    g.add_argument("--crop", default=None, type=int,
                   help="CenterCrop size (default and reference: 224; --data_path demo: the image size, default 28)")
    g.add_argument("--cache_dir", default=None,
                   help="feature cache folder (default ~/.cache/dino_fast/features; 'none' to disable)")


def pick_device(name: str):
    """torch.device for --device (auto: cuda when available)."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def cache_dir(name: str | None) -> str | None:
    from dino_fast.eval.features import FeatureCache
    if name is None:
        return FeatureCache.default_dir()
    return None if name.lower() in ("none", "off", "") else name


def fail(command: str, err: BaseException) -> int:
    """One-line error on stderr, exit status 2."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"dino-fast {command}: error: {msg}", file=sys.stderr)
    return 2
