"""The step's speed options, each against today's step on the same device in the same run:
img/s, MFU, peak memory, compile time (dino_fast.benchmark.step_options).

Variants: --compile blocks, --compile model, --fused_optimizer, --activation_checkpointing full
and selective, --efficient_drop_path, --cuda_graph_teacher (CUDA only), and "combined"
(compile blocks + fused AdamW + efficient drop path); "baseline" is the default step. On a GPU:
ViT-S/16, batch 64, 2 x 224 + 10 x 96 crops, drop path 0.1, bf16 autocast, one device (add
ViT-B/8 batch 32 with DINO_FAST_BENCH_VIT_B8=1; each compiled variant costs minutes of warm-up);
records go to bench/results/step_options_<device>.json (save_record) and, as bench cases, to
the device baseline that tools/bench_table.py turns into the README table. On the CPU (smoke) a
2-block ViT-tiny on tiny crops runs every variant that the CPU has, compiled with aot_eager,
and the first-step loss of each variant that keeps the draws must equal the baseline's.
"""
from __future__ import annotations

import os

import pytest
import torch

from dino_fast.benchmark import record
from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark.step_options import CUDA_ONLY, SAME_NUMBERS, VARIANTS, measure
from dino_fast.model.flops import dino_step_flops_per_image
from dino_fast.train.presets import resolve

CASES = {"vit_s16": (dict(arch="vit_small", patch_size=16), 64)}
if os.environ.get("DINO_FAST_BENCH_VIT_B8"):
    CASES["vit_b8"] = (dict(arch="vit_base", patch_size=8), 32)
SMOKE = dict(arch="vit_tiny", patch_size=4, depth=2, out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32,
             global_size=16, local_size=8, local_crops_number=4)
_BASELINE: dict[str, dict] = {}   # case -> the baseline's numbers of this run


def _cfg(case: str, smoke: bool, over: dict):
    base, batch = (SMOKE, 4) if smoke else CASES[case]
    return resolve(None, {**base, "data_path": "demo", "batch_size_per_gpu": batch, "epochs": 10,
                          "warmup_epochs": 1, "freeze_last_layer": 0, "drop_path_rate": 0.1,
                          "local_crops_number": base.get("local_crops_number", 10), "device": "auto",
                          "global_size": base.get("global_size", 224), "local_size": base.get("local_size", 96),
                          **over})


def _run(case, variant, device, smoke) -> dict:
    cfg = _cfg(case, smoke, VARIANTS[variant])
    kw = dict(warmup=1, iters=2, compile_backend="aot_eager") if smoke else dict(warmup=3, iters=10)
    return cfg, measure(cfg, device, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", ["smoke"] + list(CASES))
def test_step_options(benchmark, device, smoke, spec, case, variant):
    if smoke != (case == "smoke"):
        pytest.skip("smoke case on the CPU only; real cases on a GPU only")
    if variant in CUDA_ONLY and device.type != "cuda":
        pytest.skip(f"{variant} needs a CUDA GPU")
    torch._dynamo.reset()
    if case not in _BASELINE:
        _BASELINE[case] = _run(case, "baseline", device, smoke)[1]
    base = _BASELINE[case]
    cfg, got = (_cfg(case, smoke, {}), base) if variant == "baseline" else _run(case, variant, device, smoke)

    # correctness: the same weights and crops give the baseline's first-step loss
    assert torch.isfinite(torch.tensor(got["first_loss"]))
    if variant in SAME_NUMBERS:
        assert got["first_loss"] == pytest.approx(base["first_loss"], rel=2e-2 if device.type == "cuda" else 1e-4)

    b = cfg.batch_size_per_gpu
    net = _meta_network(cfg)
    flops = b * dino_step_flops_per_image(net.backbone, cfg.global_size, cfg.local_size, 2, cfg.local_crops_number,
                                          head=net.head)
    rec = record(got["ms"], spec, flops=flops, ref_ms=base["ms"], ref_name="default step",
                 variant=f"{case}/{variant}", batch=b, img_s=b * 1000 / got["ms"], ref_img_s=b * 1000 / base["ms"],
                 compile_s=got["compile_s"], ref_compile_s=base["compile_s"],
                 peak_mem_bytes=got.get("peak_mem_bytes"), ref_peak_mem_bytes=base.get("peak_mem_bytes"),
                 crops=f"2x{cfg.global_size}+{cfg.local_crops_number}x{cfg.local_size}", options=VARIANTS[variant],
                 smoke=smoke)
    benchmark.extra_info.update(rec)
    if not smoke:
        save_record("step_options", rec["variant"], rec)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _meta_network(cfg):
    """The student on the meta device: its shapes for the FLOP count."""
    from dino_fast.train.build import build_network
    with torch.device("meta"):
        return build_network(cfg, student=True)
