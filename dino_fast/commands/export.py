"""`dino-fast export`: a checkpoint's backbone as the reference's
backbone-only .pth, a timm state dict, or safetensors with the config.
Each loads back with `dino_fast.load(path)`."""
from __future__ import annotations

HELP = "export a checkpoint (reference, timm, safetensors)"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    add_checkpoint_args(parser)
    g = parser.add_argument_group("export")
    g.add_argument("--format", default="reference", choices=("reference", "timm", "safetensors"),
                   help="reference: plain backbone state dict (hubconf); timm: for timm vit_*_patch*_224; "
                        "safetensors: weights + config (pip install 'dino-fast[export]')")
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
    if args.format == "timm":
        try:
            import timm

            from dino_fast.model.timm_interop import timm_model_name
            name = timm_model_name(_Dims(cfg))
            if not timm.is_model(name.split(".")[0]):
                raise ValueError(name)
            print(f"load with: timm.create_model('{name}', pretrained=False, num_classes=0"
                  + (f", img_size={args.timm_img_size}" if args.timm_img_size else "")
                  + f", depth={cfg.depth}).load_state_dict(torch.load('{args.output}'))")
        except (ValueError, ImportError):  # no registered timm name: build timm's VisionTransformer directly
            print(f"load with: timm.models.vision_transformer.VisionTransformer(img_size="
                  f"{args.timm_img_size or cfg.img_size}, patch_size={cfg.patch_size}, embed_dim={cfg.embed_dim}, "
                  f"depth={cfg.depth}, num_heads={cfg.num_heads}, num_classes=0)"
                  f".load_state_dict(torch.load('{args.output}'))")
    else:
        print(f"load with: dino_fast.load('{args.output}')")
    return 0


class _Dims:
    """The two attributes timm_model_name reads, from a BackboneConfig."""

    def __init__(self, cfg):
        self.embed_dim = cfg.embed_dim
        self.patch_embed = type("P", (), {"patch_size": cfg.patch_size})()
