"""`dino-fast retrieval`: image retrieval with a checkpoint's CLS features.

- `--dataset roxford5k | rparis6k`: the revisited Oxford / Paris protocol
  (revisitop; the reference eval_image_retrieval.py): database images and
  queries (cropped to their bounding box, `--crop_queries`) shrunk so the
  longer side is `--imsize`, CLS features (optionally averaged over 3
  scales, `--multiscale`), L2-normalised, cosine ranking; mAP and mP@k for
  the Medium and Hard splits.
- `--dataset folder`: any ImageFolder; the class is the relevance. With
  train/ and val/ subfolders val/ queries train/; otherwise every image
  queries all the others. mAP, recall@k and precision@k.
"""
from __future__ import annotations

from dino_fast.flags import add_bool_argument

HELP = "image retrieval: revisited Oxford/Paris (mAP Medium/Hard) or an ImageFolder (mAP, recall@k)"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    add_checkpoint_args(parser)
    g = parser.add_argument_group("retrieval")
    g.add_argument("--data_path", required=True,
                   help="revisitop root (holding roxford5k/ or rparis6k/ with gnd_*.pkl and jpg/), or an ImageFolder")
    g.add_argument("--dataset", default="roxford5k", choices=("roxford5k", "rparis6k", "folder"),
                   help="the revisited benchmark, or 'folder' for an ImageFolder with the class as relevance")
    g.add_argument("--imsize", default=224, type=int,
                   help="revisited: longer side of every image after shrinking (reference: 224)")
    add_bool_argument(g, "--multiscale", default=False,
                   help="average the CLS feature over scales 1, 1/sqrt(2), 1/2 (reference option)")
    add_bool_argument(g, "--crop_queries", default=True,
                   help="revisited: crop each query to its bounding box (the revisitop protocol; "
                        "the reference DINO script uses the whole query image: false)")
    g.add_argument("--ks", default=[1, 5, 10], type=int, nargs="+", help="k of mP@k / recall@k")
    g.add_argument("--resize", default=256, type=int, help="folder: shorter side after Resize (bicubic)")
    g.add_argument("--crop", default=224, type=int, help="folder: CenterCrop size")
    g.add_argument("--batch_size", default=64, type=int, help="folder: images per forward pass")
    g.add_argument("--num_workers", default=8, type=int, help="data loading processes")
    g.add_argument("--output", default="retrieval.json", help="JSON results file (written atomically)")


def _revisited(args, model, device) -> dict:
    from torchvision import transforms as T

    from dino_fast.eval.dense import multiscale_cls
    from dino_fast.eval.features import cls_features, extract_features
    from dino_fast.eval.image_list import ImageListDataset, Thumbnail, image_loader, normalize_transform
    from dino_fast.eval.retrieval import rank_database, revisited_evaluate
    from dino_fast.eval.revisitop import load_revisited

    ds = load_revisited(args.data_path, args.dataset)
    print(f"{ds.name}: {len(ds.imlist)} database images, {len(ds.qimlist)} queries ({ds.root})")
    tf = T.Compose([Thumbnail(args.imsize), normalize_transform()])
    fn = multiscale_cls if args.multiscale else cls_features

    def feats(dataset, desc):
        # images differ in size: one per batch, as the reference
        return extract_features(model, image_loader(dataset, 1, args.num_workers, device), device,
                                feature_fn=fn, normalize=True, progress=True, desc=desc)
    db = feats(ImageListDataset(ds.db_paths(), tf), "database")
    q = feats(ImageListDataset(ds.query_paths(), tf, ds.query_boxes() if args.crop_queries else None), "queries")
    ranks = rank_database(db, q)
    res = revisited_evaluate(ranks, ds.gnd, args.ks, ("easy", "medium", "hard"))
    for split in ("medium", "hard"):
        mp = "  ".join(f"mP@{k} {v:.2f}" for k, v in res[split]["mp@k"].items())
        print(f"{ds.name} {split:>6}: mAP {res[split]['map']:.2f}  {mp}")
    return {"dataset": ds.name, "database": len(ds.imlist), "queries": len(ds.qimlist), "results": res,
            "imsize": args.imsize, "multiscale": args.multiscale, "crop_queries": args.crop_queries}


def _folder(args, model, device) -> dict:
    import os

    from dino_fast.eval.data import eval_transform, image_folder, train_val_folders
    from dino_fast.eval.features import dataset_features
    from dino_fast.eval.retrieval import class_retrieval

    tf = eval_transform(args.resize, args.crop)
    common = dict(checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, batch_size=args.batch_size,
                  num_workers=args.num_workers, device=device, cache_dir=None)
    if os.path.isdir(os.path.join(args.data_path, "train")) and os.path.isdir(os.path.join(args.data_path, "val")):
        db_ds, q_ds = train_val_folders(args.data_path, tf)
        db, db_y = dataset_features(model, db_ds, desc="database (train/)", **common)
        q, q_y = dataset_features(model, q_ds, desc="queries (val/)", **common)
        res = class_retrieval(db, db_y, q, q_y, args.ks)
        mode = "val/ queries train/"
    else:
        ds = image_folder(args.data_path, tf)
        db, db_y = dataset_features(model, ds, desc="images", **common)
        res = class_retrieval(db, db_y, db, db_y, args.ks, exclude_self=True)
        mode = "each image queries the others"
    rec = "  ".join(f"R@{k} {v:.2f}" for k, v in res["recall@k"].items())
    print(f"{args.data_path} ({mode}): mAP {res['map']:.2f}  {rec}")
    return {"dataset": "folder", "data_path": args.data_path, "mode": mode, "results": res}


def run(args) -> int:
    from dino_fast.eval.cli_common import USER_ERRORS, fail, pick_device
    from dino_fast.eval.io import atomic_write_json
    from dino_fast.eval.load import load_with_config

    try:
        if min(args.ks) < 1 or args.imsize < 1:
            raise ValueError("--ks values and --imsize must be >= 1")
        device = pick_device(args.device)
        model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                      patch_size=args.patch_size, attention=args.attention, device=device)
        print(f"{args.checkpoint}: {cfg.name} ({args.checkpoint_key}), device {device}")
        out = _folder(args, model, device) if args.dataset == "folder" else _revisited(args, model, device)
    except USER_ERRORS as e:
        return fail("retrieval", e)
    out.update(checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, model=cfg.to_dict())
    atomic_write_json(out, args.output)
    print(f"results written to {args.output}")
    return 0
