"""The demo run (`dino-fast train` with no arguments): wall time, img/s and the teacher's
k-NN before / after, on the machine the bench runs on.

Full size (the demo preset as a user runs it: training + both k-NN evaluations) on a GPU
machine, or on any machine with DINO_FAST_BENCH_FULL_DEMO=1 (the README's demo time comes
from that run on a 2-core CPU); the record goes to bench/results/demo_<device>.json. In
smoke mode (no GPU, CI) a smoke-size run of the same preset (one short epoch on 512 images)
checks that the demo trains end to end and reports its numbers without saving them.
"""
import json
import os
import resource
import time

import torch

from dino_fast.benchmark.baseline import save_record
from dino_fast.train.loop import train
from dino_fast.train.presets import resolve

FULL = os.environ.get("DINO_FAST_BENCH_FULL_DEMO", "") not in ("", "0")
SMOKE_OVERRIDES = dict(max_images=512, epochs=1, warmup_epochs=0, warmup_teacher_temp_epochs=0,
                       freeze_last_layer=0)


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def test_demo(benchmark, device, smoke, spec, tmp_path):
    full = FULL or not smoke
    cfg = resolve(None, dict(output_dir=str(tmp_path / "dino_demo"), **({} if full else SMOKE_OVERRIDES)))
    assert cfg.preset == "demo"
    t0, c0 = time.perf_counter(), _cpu_s()
    summary = train(cfg)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    epochs = summary["epochs"]
    train_s = sum(e["time_s"] for e in epochs)
    images = sum(e["img_s"] * e["time_s"] for e in epochs)
    rec = {"device": spec.kind, "device_name": spec.name, "ms": wall * 1e3, "wall_s": wall, "train_s": train_s,
           "img_s": images / train_s, "cpu_s": cpu, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "epochs": len(epochs),
           "images_per_epoch": cfg.max_images or 4000, "knn_before": summary["knn_before"],
           "knn_after": summary["knn_after"], "knn_gain": summary["knn_after"] - summary["knn_before"],
           "smoke": not full, "op": "demo", "variant": "full" if full else "smoke"}
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)     # the run above is the measurement
    assert len(epochs) == cfg.epochs and all(e["loss"] == e["loss"] for e in epochs)   # finite
    if full:
        save_record("demo", rec["variant"], rec)
