"""Multi-crop ViT bench: forward + backward of a ViT-B/8 student step
(2 x 224 + 10 x 96 crops, DINO head out_dim 65536, bf16 autocast), packed
(every block once for all crops) vs per-group (the reference's loop, our
kernels) vs the reference model (tests/reference_vit.py: per-group, explicit
softmax attention), per attention backend, timed in the same run.

FLOPs: dino_fast.model.flops (GEMMs + 4 L^2 D attention, backward = 2x
forward) -> img/s and MFU against the device's bf16 peak. Goal on an H100:
packed >= 50 % MFU and faster than per-group. On a GPU each record is merged
into bench/results/model_<device>.json; on the CPU (smoke) a tiny ViT runs at
tiny crops and packed == per-group is asserted.
"""
import json
import os

import pytest
import torch

import dino_fast.model as dm
import tests.reference_vit as ref
from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark import bench_autocast, fwd_bwd_step, peak_extra_memory, record, time_ms
from dino_fast.model.attention import has_varlen, has_xformers
from dino_fast.model.flops import multicrop_fwd_bwd_flops

GPU_CFG = dict(arch="vit_base", patch=8, depth=12, out_dim=65536, hidden=2048, bottleneck=256,
               batch=int(os.environ.get("DINO_BENCH_BATCH", "16")), global_size=224, local_size=96, n_local=10)
SMOKE_CFG = dict(arch="vit_tiny", patch=8, depth=2, out_dim=256, hidden=64, bottleneck=32,
                 batch=2, global_size=32, local_size=16, n_local=10)




def gpu_backends() -> list[str]:
    out = ["sdpa", "flex"]
    if has_varlen():
        out.append("flash")
    if has_xformers():
        out.append("xformers")
    return out


def crops_for(cfg, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, gs, ls = cfg["batch"], cfg["global_size"], cfg["local_size"]
    sizes = [gs, gs] + [ls] * cfg["n_local"]
    return [torch.randn(b, 3, s, s, generator=g).to(device, dtype) for s in sizes], sizes


def build(cfg, device, backend, packed=True, reference=False):
    torch.manual_seed(0)
    lib = ref if reference else dm
    kw = {} if reference else dict(attention=backend)
    backbone = getattr(lib, cfg["arch"])(patch_size=cfg["patch"], depth=cfg["depth"], **kw)
    head = lib.DINOHead(backbone.embed_dim, cfg["out_dim"], hidden_dim=cfg["hidden"],
                        bottleneck_dim=cfg["bottleneck"])
    w = lib.MultiCropWrapper(backbone, head)
    if not reference:
        w.packed = packed
    return w.to(device).train()


def _cases(smoke):
    if smoke:
        return [("sdpa", False)]
    return [(b, False) for b in gpu_backends()] + [("sdpa", True)] + (
        [("xformers", True)] if has_xformers() else [])


@pytest.mark.parametrize("case", range(6))
def test_model_multicrop(benchmark, device, smoke, spec, case):
    cases = _cases(smoke)
    if case >= len(cases):
        pytest.skip(f"{len(cases)} cases on this device")
    backend, compiled = cases[case]
    cfg = SMOKE_CFG if smoke else GPU_CFG
    crops, sizes = crops_for(cfg, device)
    packed = build(cfg, device, backend, packed=True)
    per_group = build(cfg, device, backend, packed=False)
    per_group.load_state_dict(packed.state_dict())

    # correctness: packed == per-group (fp32 tight on the CPU; bf16 on the GPU)
    with torch.no_grad(), bench_autocast(device):
        a, b = packed(crops).float(), per_group(crops).float()
    tol = 1e-5 if device.type == "cpu" else 3e-2
    assert (a - b).abs().max() <= tol * b.abs().max(), (backend, (a - b).abs().max().item())

    run_packed = torch.compile(packed) if compiled else packed
    iters, warm = (2, 1) if smoke else (10, 3 if not compiled else 5)
    ms = time_ms(fwd_bwd_step(run_packed, crops, device), warm, iters)
    ms_group = time_ms(fwd_bwd_step(per_group, crops, device), warm, iters)
    ms_ref = None
    if backend == "sdpa" and not compiled:  # the reference model once per device
        reference = build(cfg, device, backend, reference=True)
        ms_ref = time_ms(fwd_bwd_step(reference, crops, device), 1 if smoke else 2, 2 if smoke else 5)
        del reference
    mem = peak_extra_memory(fwd_bwd_step(run_packed, crops, device))
    flops = multicrop_fwd_bwd_flops(packed.backbone, sizes, cfg["batch"], head=packed.head)
    b = cfg["batch"]
    rec = record(ms, spec, flops=flops, ref_ms=ms_group, peak_mem=mem, op="model_multicrop",
                 variant=f"{backend}{'+compile' if compiled else ''}", arch=f"{cfg['arch']}/{cfg['patch']}",
                 crops=f"2x{cfg['global_size']}+{cfg['n_local']}x{cfg['local_size']}", batch=b, smoke=smoke,
                 img_per_s=b / (ms * 1e-3), per_group_ms=ms_group, per_group_img_per_s=b / (ms_group * 1e-3),
                 per_group_mfu=flops / (ms_group * 1e-3) / 1e12 / spec.bf16_tflops,
                 reference_ms=ms_ref, reference_img_per_s=(b / (ms_ref * 1e-3)) if ms_ref else None)
    rec["goals"] = {"mfu>=0.5": rec["mfu"] >= 0.5, "packed_faster_than_per_group": ms < ms_group}
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(fwd_bwd_step(run_packed, crops, device), rounds=1 if smoke else 5, iterations=1,
                       warmup_rounds=0 if smoke else 1)
    if not smoke:
        save_record("model", rec["variant"], rec)
