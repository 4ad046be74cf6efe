"""`dino-fast export`: a checkpoint's backbone in the official layout of its family (DINO,
DINOv2, DINOv3), explicitly as dinov2 / dinov3, as a timm state dict, or as safetensors with
the config. Each loads back with `dino_fast.load(path)`."""
from __future__ import annotations

HELP = "export a checkpoint (reference / dinov2 / dinov3 layouts, timm, safetensors)"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    from dino_fast.eval.export_formats import FORMATS
    add_checkpoint_args(parser)
    g = parser.add_argument_group("export")
    g.add_argument("--format", default="reference", choices=FORMATS,
                   help="reference: the official backbone layout of the model's family (DINO, DINOv2 or DINOv3; "
                        "a convnet's library names); dinov2 / dinov3: that layout explicitly; timm: for timm's "
                        "vit_*_dino / vit_*_dinov2 / vit_*_dinov3 models; safetensors: weights + config "
                        "(pip install 'dino-fast[export]')")
    g.add_argument("--output", required=True, help="file to write (atomically)")
    g.add_argument("--timm_img_size", default=None, type=int,
                   help="timm only: resample pos_embed for this timm input size (default: the checkpoint's)")


def run(args) -> int:
    from dino_fast.eval.cli_common import USER_ERRORS, fail
    from dino_fast.eval.export import export_checkpoint

    try:
        cfg = export_checkpoint(args.checkpoint, args.output, args.format, args.checkpoint_key,
                                timm_img_size=args.timm_img_size, arch=args.arch, patch_size=args.patch_size)
    except USER_ERRORS as e:
        return fail("export", e)
    print(f"{args.checkpoint} ({args.checkpoint_key}) -> {args.output}: {cfg.name}, {args.format} format")
    if args.format == "timm" and cfg.kind == "vit":
        from dino_fast.model.timm_interop import timm_create_kwargs, timm_model_name
        try:
            name = timm_model_name(cfg)
            kw = ", ".join(f"{k}={v!r}" for k, v in timm_create_kwargs(cfg, args.timm_img_size).items())
            print(f"load with: timm.create_model('{name}', pretrained=False, {kw})"
                  f".load_state_dict(torch.load('{args.output}'))")
        except ValueError:  # no registered timm name: build timm's VisionTransformer directly
            print(f"load with: timm.models.vision_transformer.VisionTransformer(img_size="
                  f"{args.timm_img_size or cfg.img_size}, patch_size={cfg.patch_size}, embed_dim={cfg.embed_dim}, "
                  f"depth={cfg.depth}, num_heads={cfg.num_heads}, num_classes=0)"
                  f".load_state_dict(torch.load('{args.output}'))")
    else:
        print(f"load with: dino_fast.load('{args.output}')")
    return 0
