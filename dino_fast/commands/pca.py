"""`dino-fast pca`: the first three principal components of the patch
features of a set of images as RGB maps, a foreground mask from the first
component and the foreground's own PCA (DINOv2's figure), as PNG grids:
`<output_dir>/grid.png` (one row per image: input | PCA | foreground |
foreground PCA), `<output_dir>/<image>.png` (its row) and `pca.json`."""
from __future__ import annotations

import os

HELP = "first 3 principal components of patch features as RGB maps, with a foreground mask"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    add_checkpoint_args(parser)
    g = parser.add_argument_group("PCA maps")
    g.add_argument("--image", required=True, help="an image file or a folder of images (one PCA over all of them)")
    g.add_argument("--output_dir", default="pca", help="where grid.png, one PNG per image and pca.json go")
    g.add_argument("--image_size", default=[448], type=int, nargs="+",
                   help="resize to H W (one value: the shorter side), then crop to a multiple of the patch")
    g.add_argument("--threshold", default=0.0, type=float,
                   help="foreground = first component above this (DINOv2: positive values)")
    g.add_argument("--tile", default=224, type=int, help="height in pixels of each tile of the PNGs")


def run(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from dino_fast.eval.attention import list_images, prepare_image
    from dino_fast.eval.cli_common import USER_ERRORS, fail, pick_device
    from dino_fast.eval.data import IMAGENET_MEAN, IMAGENET_STD, load_rgb
    from dino_fast.eval.dense import last_tokens, patch_size_of
    from dino_fast.eval.io import atomic_write, atomic_write_json
    from dino_fast.eval.load import load_with_config
    from dino_fast.eval.pca import pca_maps, row_image, stack_rows

    try:
        if len(args.image_size) not in (1, 2) or min(args.image_size) < 1 or args.tile < 8:
            raise ValueError(f"--image_size {args.image_size}: give one (shorter side) or two (H W) positive sizes; "
                             "--tile >= 8")
        images = list_images(args.image)
        device = pick_device(args.device)
        model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                      patch_size=args.patch_size, attention=args.attention, device=device)
        p = patch_size_of(model)
        inputs, patches = [], []
        for path in tqdm(images, desc="patch features", unit="img", dynamic_ncols=True):
            x = prepare_image(load_rgb(path), args.image_size, p, "crop")           # (3, H, W)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, tok = last_tokens(model, x[None].to(device))                      # (1, h, w, D)
            patches.append(tok[0].float().cpu())
            mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
            inputs.append(((x * std + mean).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy())
        maps = pca_maps(patches, args.threshold)
    except USER_ERRORS as e:
        return fail("pca", e)
    root = args.image if os.path.isdir(args.image) else os.path.dirname(args.image)
    rows, per_image = [], {}
    for i, path in enumerate(images):
        row = row_image(inputs[i], maps.rgb[i], maps.foreground[i], maps.fg_rgb[i], args.tile)
        rows.append(row)
        rel = os.path.splitext(os.path.relpath(path, root))[0]
        atomic_write(os.path.join(args.output_dir, rel + ".png"), lambda tmp, r=row: r.save(tmp, format="PNG"))
        per_image[rel] = {"grid": list(maps.foreground[i].shape),
                          "foreground_share": float(maps.foreground[i].float().mean())}
    grid = stack_rows(rows)
    grid_path = atomic_write(os.path.join(args.output_dir, "grid.png"), lambda tmp: grid.save(tmp, format="PNG"))
    ratio = ", ".join(f"{100 * v:.1f}%" for v in maps.variance_ratio)
    print(f"{len(images)} images, {sum(int(np.prod(t.shape[:2])) for t in patches)} patches of {cfg.name}: "
          f"components 1-3 explain {ratio} of the variance")
    for rel, info in per_image.items():
        print(f"  {rel}: {info['grid'][0]}x{info['grid'][1]} patches, foreground {100 * info['foreground_share']:.0f}%")
    atomic_write_json({"checkpoint": args.checkpoint, "checkpoint_key": args.checkpoint_key, "model": cfg.to_dict(),
                       "threshold": args.threshold, "variance_ratio": maps.variance_ratio, "images": per_image},
                      os.path.join(args.output_dir, "pca.json"))
    print(f"grid written to {grid_path}")
    return 0
