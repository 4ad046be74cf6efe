"""`dino-fast knn`: weighted k-NN top-1/top-5 of a checkpoint's features
(the reference eval_knn.py protocol: teacher CLS token, L2-normalised,
Resize 256 + CenterCrop 224, k in 10 20 100 200, T = 0.07)."""
from __future__ import annotations

import sys
import time

HELP = "weighted k-NN evaluation of a checkpoint's features"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args, add_data_args
    add_checkpoint_args(parser)
    add_data_args(parser)
    g = parser.add_argument_group("k-NN")
    g.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                   help="numbers of neighbours (20 is usually best); values above the number of train images "
                        "are clipped to it, with a warning")
    g.add_argument("--temperature", default=0.07, type=float, help="temperature T of the exp(sim / T) votes")
    g.add_argument("--output", default=None, help="also write the results as JSON here")


def run(args) -> int:
    from dino_fast.eval.cli_common import USER_ERRORS, cache_dir, fail, pick_device
    from dino_fast.eval.data import eval_datasets
    from dino_fast.eval.features import dataset_features
    from dino_fast.eval.io import atomic_write_json
    from dino_fast.eval.knn import clip_ks, format_table, knn_evaluate
    from dino_fast.eval.load import load_with_config

    try:
        device = pick_device(args.device)
        if min(args.nb_knn) < 1 or args.temperature <= 0:
            raise ValueError("--nb_knn values must be >= 1 and --temperature > 0")
        train_ds, val_ds = eval_datasets(args.data_path, args.resize, args.crop)
        model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                      patch_size=args.patch_size, attention=args.attention, device=device)
    except USER_ERRORS as e:
        return fail("knn", e)
    nb_knn, clipped = clip_ks(args.nb_knn, len(train_ds))
    if clipped:
        print(f"dino-fast knn: warning: --nb_knn {clipped}", file=sys.stderr)

    print(f"{args.checkpoint}: {cfg.name} ({args.checkpoint_key}); {len(train_ds)} train / {len(val_ds)} val "
          f"images, {len(train_ds.classes)} classes, device {device}")
    common = dict(checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, kind="cls", batch_size=args.batch_size,
                  num_workers=args.num_workers, device=device, cache_dir=cache_dir(args.cache_dir))
    t0 = time.perf_counter()
    train_f, train_y = dataset_features(model, train_ds, desc="train features", **common)
    val_f, val_y = dataset_features(model, val_ds, desc="val features", **common)
    t1 = time.perf_counter()
    results = knn_evaluate(train_f, train_y, val_f, val_y, nb_knn, args.temperature,
                           num_classes=len(train_ds.classes))
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(format_table(results, f"weighted k-NN (T={args.temperature}), {args.checkpoint_key} CLS features"))
    print(f"features {t1 - t0:.1f} s, k-NN search {t2 - t1:.2f} s")
    if args.output:
        atomic_write_json({"checkpoint": args.checkpoint, "checkpoint_key": args.checkpoint_key, "model": cfg.to_dict(),
                           "temperature": args.temperature,
                           "results": {str(k): {"top1": t1_, "top5": t5_} for k, (t1_, t5_) in results.items()}},
                          args.output)
        print(f"results written to {args.output}")
    return 0
