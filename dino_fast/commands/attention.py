"""`dino-fast attention`: the last block's CLS self-attention per head as
PNG heatmaps, overlays and 60 %-mass masks, plus one grid PNG per image
(the reference visualize_attention.py, Pillow only)."""
from __future__ import annotations

import os

HELP = "self-attention maps of the CLS token as PNGs"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    add_checkpoint_args(parser)
    g = parser.add_argument_group("attention maps")
    g.add_argument("--image", required=True, help="an image file or a folder of images")
    g.add_argument("--output_dir", default="attention", help="where the PNGs go (one subfolder per image)")
    g.add_argument("--image_size", default=[480, 480], type=int, nargs="+",
                   help="resize to H W (one value: the shorter side); reference: 480 480")
    g.add_argument("--threshold", default=0.6, type=float,
                   help="masks keep the patches holding this share of the attention mass (0 disables masks)")
    g.add_argument("--fit", default="crop", choices=("crop", "resize"),
                   help="make the size a multiple of the patch by cropping (reference) or resizing")


def run(args) -> int:
    from tqdm import tqdm

    from dino_fast.eval.attention import list_images, visualize
    from dino_fast.eval.cli_common import USER_ERRORS, fail, pick_device
    from dino_fast.eval.load import load_with_config

    try:
        if len(args.image_size) not in (1, 2) or min(args.image_size) < 1:
            raise ValueError(f"--image_size {args.image_size}: give one (shorter side) or two (H W) positive sizes")
        images = list_images(args.image)
        device = pick_device(args.device)
        model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                      patch_size=args.patch_size, attention=args.attention, device=device)
        if cfg.kind == "convnet":
            raise ValueError(f"{args.checkpoint} holds a convnet ({cfg.arch}): attention maps need a ViT")
    except USER_ERRORS as e:
        return fail("attention", e)
    threshold = args.threshold if args.threshold and args.threshold > 0 else None
    root = args.image if os.path.isdir(args.image) else os.path.dirname(args.image)
    failed = 0
    for path in tqdm(images, desc="attention maps", unit="img", disable=len(images) < 2):
        rel = os.path.splitext(os.path.relpath(path, root))[0]
        out = os.path.join(args.output_dir, rel)
        try:
            maps, written = visualize(model, path, out, cfg.patch_size, args.image_size, threshold, args.fit)
        except (RuntimeError, ValueError) as e:  # unreadable / too small image: report, go on
            print(f"dino-fast attention: skipped {path}: {e}")
            failed += 1
            continue
        h, w = maps.image.shape[1:]
        print(f"{path}: {maps.attentions.shape[0]} heads on a {h}x{w} crop -> {out}/ ({len(written)} PNGs, grid.png)")
    return 1 if failed == len(images) else 0
