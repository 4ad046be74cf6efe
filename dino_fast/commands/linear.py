"""`dino-fast linear`: linear probe on frozen features (the reference
eval_linear.py recipe), trained on features computed ONCE and cached."""
from __future__ import annotations

import os
import time

HELP = "linear probe on frozen features"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args, add_data_args
    from dino_fast.flags import add_bool_argument
    add_checkpoint_args(parser)
    add_data_args(parser)
    g = parser.add_argument_group("linear probe")
    g.add_argument("--n_last_blocks", default=None, type=int,
                   help="concatenate the CLS tokens of the last n blocks (default: 4, ViT-B: 1)")
    add_bool_argument(g, "--avgpool_patchtokens", default=None,
                      help="append the averaged patch tokens (default: false, ViT-B: true)")
    g.add_argument("--epochs", default=100, type=int, help="probe epochs (reference: 100)")
    g.add_argument("--lr", default=0.001, type=float,
                   help="base lr per 256 images; the step lr is lr * probe_batch_size / 256 (reference: 0.001)")
    g.add_argument("--lr_grid", default=None, type=float, nargs="*",
                   help="train one probe per base lr (no values: 1e-5 .. 0.1, DINOv2's grid) and keep the best "
                        "on val")
    g.add_argument("--probe_batch_size", default=1024, type=int,
                   help="probe batch (reference: 128 per GPU x 8 GPUs = 1024)")
    g.add_argument("--val_freq", default=1, type=int, help="validate every n epochs")
    g.add_argument("--output_dir", default=".", help="where linear_probe.pth and linear_probe.json go")
    g.add_argument("--seed", default=0, type=int)


def run(args) -> int:
    from dino_fast.eval.cli_common import USER_ERRORS, cache_dir, fail, pick_device
    from dino_fast.eval.data import eval_datasets
    from dino_fast.eval.features import dataset_features
    from dino_fast.eval.io import atomic_torch_save, atomic_write_json
    from dino_fast.eval.linear import DEFAULT_LR_GRID, default_probe_layout, linear_features, train_linear_probe
    from dino_fast.eval.load import load_with_config

    try:
        device = pick_device(args.device)
        train_ds, val_ds = eval_datasets(args.data_path, args.resize, args.crop)
        model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                      patch_size=args.patch_size, attention=args.attention, device=device)
        n_default, pool_default = default_probe_layout(cfg.embed_dim)
        n = args.n_last_blocks or n_default
        pool = pool_default if args.avgpool_patchtokens is None else args.avgpool_patchtokens
        if cfg.kind == "convnet":  # the pooled features, as the reference's ResNet probe
            n, pool = 1, False
        elif not 1 <= n <= cfg.depth:
            raise ValueError(f"--n_last_blocks {n}: the model has {cfg.depth} blocks")
        if pool and n != 1:
            raise ValueError("--avgpool_patchtokens true needs --n_last_blocks 1 (the reference's layout)")
    except USER_ERRORS as e:
        return fail("linear", e)
    lr_grid = None if args.lr_grid is None else (args.lr_grid or list(DEFAULT_LR_GRID))
    print(f"{args.checkpoint}: {cfg.name} ({args.checkpoint_key}); {len(train_ds)} train / {len(val_ds)} val "
          f"images, {len(train_ds.classes)} classes; features: "
          + ("the pooled convnet features" if cfg.kind == "convnet" else
             f"CLS of the last {n} block(s){' + avg-pooled patch tokens' if pool else ''}"))
    print("note: train features are computed once without augmentation (the reference re-augments every "
          "epoch with RandomResizedCrop + flip); expect accuracies close to, not equal to, the reference protocol")

    def fn(m, x):
        return linear_features(m, x, n, pool)

    common = dict(checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, kind=f"linear-n{n}-avgpool{int(pool)}",
                  feature_fn=fn, normalize=False, batch_size=args.batch_size, num_workers=args.num_workers,
                  device=device, cache_dir=cache_dir(args.cache_dir))
    t0 = time.perf_counter()
    train_f, train_y = dataset_features(model, train_ds, desc="train features", **common)
    val_f, val_y = dataset_features(model, val_ds, desc="val features", **common)
    t1 = time.perf_counter()
    res = train_linear_probe(train_f, train_y, val_f, val_y, len(train_ds.classes), epochs=args.epochs, lr=args.lr,
                             lr_grid=lr_grid, batch_size=args.probe_batch_size, val_freq=args.val_freq,
                             seed=args.seed, progress=True)
    t2 = time.perf_counter()
    if lr_grid:
        print("lr grid (base lr per 256 -> val top-1): "
              + ", ".join(f"{b:g}: {a:.2f}" for b, a in sorted(res.grid.items())))
    top5 = f", top-5 {res.top5:.2f}" if res.top5 is not None else ""
    print(f"linear probe (lr {res.lr:g} per 256, {args.epochs} epochs): val top-1 {res.top1:.2f}{top5} "
          f"(best top-1 over epochs {res.best_top1:.2f}); features {t1 - t0:.1f} s, probe {t2 - t1:.1f} s")
    os.makedirs(args.output_dir, exist_ok=True)
    probe_path = os.path.join(args.output_dir, "linear_probe.pth")
    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in res.classifier.state_dict().items()},
                       "epoch": args.epochs, "best_acc": res.best_top1, "acc1": res.top1, "acc5": res.top5,
                       "lr": res.lr, "n_last_blocks": n, "avgpool_patchtokens": pool,
                       "num_labels": len(train_ds.classes), "classes": list(train_ds.classes),
                       "checkpoint": os.path.abspath(args.checkpoint), "checkpoint_key": args.checkpoint_key,
                       "model": cfg.to_dict()}, probe_path)
    atomic_write_json({"top1": res.top1, "top5": res.top5, "best_top1": res.best_top1, "lr": res.lr,
                       "grid": {str(k): v for k, v in res.grid.items()}, "history": res.history,
                       "n_last_blocks": n, "avgpool_patchtokens": pool, "epochs": args.epochs,
                       "probe_batch_size": args.probe_batch_size},
                      os.path.join(args.output_dir, "linear_probe.json"))
    print(f"probe saved to {probe_path}")
    return 0
