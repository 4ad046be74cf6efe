"""`dino-fast copydetect`: copy detection on Copydays as the reference
eval_copy_detection.py: [CLS | GeM(patches)] features of square-resized
images, PCA whitening learned on `--whitening_path`, originals (plus
`--distractors_path`) as the database, mAP of each query block from the
first `--topk` results."""
from __future__ import annotations

from dino_fast.flags import add_bool_argument

HELP = "copy detection on Copydays (CLS + GeM features, whitening, mAP per block)"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    add_checkpoint_args(parser)
    g = parser.add_argument_group("copy detection")
    g.add_argument("--data_path", required=True,
                   help="Copydays folder: original/, strong/, jpegqual/<q>/, crops/<c>/")
    g.add_argument("--whitening_path", default=None,
                   help="folder of images to learn the PCA whitening on (paper: 20k random YFCC100M images); "
                        "omitted: no whitening")
    g.add_argument("--distractors_path", default=None,
                   help="folder of distractor images added to the database (paper: 10k YFCC100M images)")
    g.add_argument("--imsize", default=320, type=int, help="square input size (reference: 320)")
    g.add_argument("--gem_p", default=4.0, type=float, help="GeM exponent of the patch pooling (reference: 4)")
    g.add_argument("--topk", default=20, type=int, help="results per query scored by AP (reference: 20)")
    add_bool_argument(g, "--centered_whitening", default=False,
                   help="learn the whitening from the centred covariance (the reference uses the uncentred "
                        "second moment: false)")
    g.add_argument("--batch_size", default=16, type=int, help="images per forward pass")
    g.add_argument("--num_workers", default=8, type=int, help="data loading processes")
    g.add_argument("--output", default="copydetect.json", help="JSON results file (written atomically)")


def run(args) -> int:
    from functools import partial

    from torchvision import transforms as T

    from dino_fast.eval.cli_common import USER_ERRORS, fail, pick_device
    from dino_fast.eval.copydetect import copy_detection, load_copydays
    from dino_fast.eval.data import IMAGENET_MEAN, IMAGENET_STD
    from dino_fast.eval.dense import cls_gem_features
    from dino_fast.eval.features import extract_features
    from dino_fast.eval.image_list import ImageListDataset, image_loader, list_image_files
    from dino_fast.eval.io import atomic_write_json
    from dino_fast.eval.load import load_with_config

    try:
        if args.imsize < 1 or args.topk < 1 or args.gem_p <= 0:
            raise ValueError("--imsize and --topk must be >= 1 and --gem_p > 0")
        layout = load_copydays(args.data_path)
        whit = list_image_files(args.whitening_path, "--whitening_path") if args.whitening_path else None
        distract = list_image_files(args.distractors_path, "--distractors_path") if args.distractors_path else None
        device = pick_device(args.device)
        model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                      patch_size=args.patch_size, attention=args.attention, device=device)
    except USER_ERRORS as e:
        return fail("copydetect", e)
    n_q = sum(len(layout.paths(b)) for b in layout.query_blocks())
    print(f"{args.checkpoint}: {cfg.name} ({args.checkpoint_key}), device {device}; Copydays {len(layout.originals)} "
          f"originals, {n_q} queries in {len(layout.query_blocks())} blocks, {len(distract or [])} distractors, "
          f"{len(whit or [])} whitening images")
    tf = T.Compose([T.Resize((args.imsize, args.imsize), interpolation=T.InterpolationMode.BICUBIC),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    feature_fn = partial(cls_gem_features, p=args.gem_p)

    def extract(paths):
        ds = ImageListDataset(paths, tf)
        return extract_features(model, image_loader(ds, args.batch_size, args.num_workers, device), device,
                                feature_fn=feature_fn, normalize=False, progress=True, desc="features")
    try:
        res = copy_detection(layout, extract, whitening_paths=whit, distractor_paths=distract, topk=args.topk,
                             centered_whitening=args.centered_whitening)
    except ValueError as e:
        return fail("copydetect", e)
    for b, v in res["blocks"].items():
        print(f"{b:>12}: mAP {v:.2f}")
    print(f"mean over the copy blocks: {res['mean_copies']:.2f}"
          + (f" (strong: {res['blocks']['strong']:.2f})" if "strong" in res["blocks"] else ""))
    res.update(checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, model=cfg.to_dict(),
               imsize=args.imsize, gem_p=args.gem_p)
    atomic_write_json(res, args.output)
    print(f"results written to {args.output}")
    return 0
