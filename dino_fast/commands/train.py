"""`dino-fast train`: DINO pretraining. With no arguments: the demo preset
(a small ViT on the Fashion-MNIST images shipped in the package, a few minutes
on a CPU, k-NN accuracy of the teacher before and after)."""
from __future__ import annotations

import sys
import time

HELP = "pretrain a ViT with DINO, or DINOv2 / DINOv3 with --method dinov2 (no arguments: the demo run)"


def add_arguments(parser) -> None:
    """`--preset NAME` plus `--<field> value` for every TrainConfig field (defaults suppressed,
    so only the flags given on the command line override the preset; booleans also bare)."""
    import argparse
    from dataclasses import fields

    from dino_fast.flags import add_bool_argument
    from dino_fast.train.config import TrainConfig, field_docs
    from dino_fast.train.presets import PRESETS
    from dino_fast.train.step_options import MODE_FIELDS, add_mode_argument
    docs = field_docs()
    parser.add_argument("--preset", default=None, help=f"start from a named config: {', '.join(PRESETS)} "
                        "(default: demo when no --data_path is given; with --data_path, small on a CPU or for "
                        "fewer than 20000 images, else the reference defaults; the choice is printed)")
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        text = (docs.get(f.name, "") + f" (default {f.default!r})").replace("%", "%%")
        if f.name in MODE_FIELDS:   # --compile / --activation_checkpointing: a mode word or bare
            add_mode_argument(parser, f.name, help=text)
            continue
        if f.type in ("bool", bool):
            add_bool_argument(parser, f"--{f.name}", default=argparse.SUPPRESS, help=text)
            continue
        kw = dict(default=argparse.SUPPRESS, help=text)
        if f.type in ("tuple", tuple):
            kw.update(type=float, nargs=2, metavar=("MIN", "MAX"))
        else:
            kw.update(type={"int": int, "float": float, "str": str}[str(f.type)])
        parser.add_argument(f"--{f.name}", **kw)


def overrides_from_args(args) -> dict:
    """The TrainConfig fields given on the command line."""
    from dataclasses import fields

    from dino_fast.train.config import TrainConfig
    names = {f.name for f in fields(TrainConfig)} - {"preset"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in names}


def run(args) -> int:
    from dino_fast.train.config import ConfigError
    from dino_fast.train.presets import resolve
    from dino_fast.train.sizing import choose_sizes  # userdata: --data_path without --preset
    try:
        preset, overrides, chosen = choose_sizes(args.preset, overrides_from_args(args))
        cfg = resolve(preset, overrides)
    except ConfigError as exc:
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 2
    if chosen:
        print(f"dino-fast train: {chosen}", file=sys.stderr)
    if cfg.dry_run:
        return _dry_run(cfg)
    from dino_fast.train.interrupt import Interrupted
    from dino_fast.train.loop import TrainingStopped, train
    from dino_fast.train.resume_check import RunComplete
    arch = f"init from {cfg.init_from}" if cfg.init_from else f"{cfg.arch}/{cfg.patch_size}"
    print(f"dino-fast train: preset {cfg.preset or '(none)'}, {arch}, data {cfg.data_path}, "
          f"{cfg.epochs} epochs, output {cfg.output_dir}", file=sys.stderr)
    t0 = time.time()
    try:
        summary = train(cfg)
    except TrainingStopped as exc:
        print(f"dino-fast train: stopped: {exc}", file=sys.stderr)
        return 3
    except RunComplete as exc:  # nothing written
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 0
    except Interrupted as exc:  # every rank exits 128 + signal; rank 0 says where
        if exc.rank == 0:
            print(f"dino-fast train: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dino-fast train: interrupted (SIGINT); rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ not in ("TrainingOutOfMemoryError", "CollectiveError"):
            raise
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 4
    finally:
        from dino_fast.runtime.launch import cleanup
        cleanup()
    minutes = (time.time() - t0) / 60
    epochs = summary["epochs"]
    if epochs:
        print(f"trained epochs {summary['start_epoch'] + 1}-{summary['start_epoch'] + len(epochs)} in "
              f"{minutes:.1f} min: loss {epochs[0]['loss']:.4f} -> {epochs[-1]['loss']:.4f}, "
              f"{epochs[-1]['img_s']:.1f} img/s")
    if "knn_before" in summary:
        print(f"teacher weighted 20-NN top-1 (T=0.07) on the demo test images: "
              f"{summary['knn_before']:.1f}% before training -> {summary['knn_after']:.1f}% after")
    if summary.get("monitor"):
        print("k-NN monitor (" + cfg.monitor_knn + "), top-1 after epoch: " + ", ".join(
            f"{r['epoch'] + 1}: {r['monitor_knn_top1']:.1f}%" for r in summary["monitor"]))
    print(f"outputs in {cfg.output_dir}: checkpoint.pth, log.jsonl, loss_curve.png, config.json")
    return 0


def _dry_run(cfg) -> int:
    """Build the student on the meta device (no memory: a ViT-7B is counted too), print its
    parameter count and the memory plan, train nothing."""
    import os

    import torch

    from dino_fast.train.build import build_network
    from dino_fast.runtime.memory import format_plan, memory_plan_from_config
    init = None
    if cfg.init_from:
        from dino_fast.train.init_from import read_init
        init = read_init(cfg.init_from, cfg.init_from_key).architecture_only()
    from dino_fast.dinov2.network import build_dinov2_network  # --method dinov2: mask token + iBOT head
    build = build_dinov2_network if cfg.method == "dinov2" else build_network
    with torch.device("meta"):
        student = build(cfg, student=True, init=init)
    n_params = sum(p.numel() for p in student.parameters())
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    from dino_fast.model.backbone_config import config_from_model
    name = config_from_model(student.backbone).name
    print(f"dry run: {name} student built with {n_params:,} parameters "
          f"(backbone {sum(p.numel() for p in student.backbone.parameters()):,}, head "
          f"{sum(p.numel() for p in student.head.parameters()):,}); world size {world}")
    plan = memory_plan_from_config(cfg, world_size=world, gpu_memory=cfg.gpu_memory or None,
                                   backbone=student.backbone)
    print(format_plan(plan))
    from dino_fast.train.sizing import checkpoint_line
    print(checkpoint_line(cfg, student))
    return 0
