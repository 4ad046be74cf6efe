"""`dino-fast train`: DINO pretraining. With no arguments: the demo preset
(a small ViT on the Fashion-MNIST images shipped in the package, a few minutes
on a CPU, k-NN accuracy of the teacher before and after)."""
from __future__ import annotations

import sys
import time

HELP = "pretrain a ViT with DINO (no arguments: the demo run)"


def add_arguments(parser) -> None:
    from dino_fast.train.config import add_arguments as add_config_arguments
    add_config_arguments(parser)


def run(args) -> int:
    from dino_fast.train.config import ConfigError, overrides_from_args
    from dino_fast.train.presets import resolve
    try:
        cfg = resolve(args.preset, overrides_from_args(args))
    except ConfigError as exc:
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        return _dry_run(cfg)
    from dino_fast.train.loop import TrainingStopped, train
    print(f"dino-fast train: preset {cfg.preset or '(none)'}, {cfg.arch}/{cfg.patch_size}, data {cfg.data_path}, "
          f"{cfg.epochs} epochs, output {cfg.output_dir}", file=sys.stderr)
    t0 = time.time()
    try:
        summary = train(cfg)
    except TrainingStopped as exc:
        print(f"dino-fast train: stopped: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ not in ("TrainingOutOfMemoryError", "CollectiveError"):
            raise
        print(f"dino-fast train: {exc}", file=sys.stderr)
        return 4
    finally:
        from dino_fast.train.launch import cleanup
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
    """Build the student, print its parameter count and the memory plan, train nothing."""
    import os
    from dino_fast.train.build import build_network
    from dino_fast.train.memory import format_plan, memory_plan_from_config
    student = build_network(cfg, student=True)
    n_params = sum(p.numel() for p in student.parameters())
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    plan = memory_plan_from_config(cfg, world_size=world, gpu_memory=cfg.gpu_memory or None)
    print(f"dry run: {cfg.arch}/{cfg.patch_size} student built with {n_params:,} parameters "
          f"(backbone {sum(p.numel() for p in student.backbone.parameters()):,}, head "
          f"{sum(p.numel() for p in student.head.parameters()):,}); world size {world}")
    print(format_plan(plan))
    return 0
