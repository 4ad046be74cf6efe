"""Memory plan and `--dry_run` for the DINOv2 / DINOv3 ViTs and convnets: parameter counts
against the built models, the activation model against what autograd saves (CPU, fp32), the
ViT-7B dry run on the meta device."""
import pytest
import torch

import dino_fast.model as dm
from dino_fast.model import DINOHead, MultiCropWrapper
from dino_fast.model.convnet import build_convnet
from dino_fast.runtime.memory import format_plan, memory_plan, memory_plan_from_config
from tests.test_memory import _saved_bytes

VITS = {
    "reg4+ls+swiglufused": dict(num_register_tokens=4, layerscale_init=0.5, ffn_layer="swiglufused"),
    "rope+reg4+swiglu": dict(pos_embed="rope", num_register_tokens=4, ffn_layer="swiglu", layerscale_init=0.5),
    "rope augmented": dict(pos_embed="rope", num_register_tokens=2, rope_rescale_coords=2.0),
}


@pytest.mark.parametrize("name", list(VITS))
@pytest.mark.parametrize("attention,ckpt", [("sdpa", False), ("math", False), ("sdpa", True)])
def test_vit_activation_model_matches_saved_tensors(name, attention, ckpt):
    depth, b, k, n_local = 2, 2, 1000, 3
    backbone = dm.vit_small(16, depth=depth, attention=attention, drop_path_rate=0.1, activation_checkpointing=ckpt,
                            **VITS[name])
    model = MultiCropWrapper(backbone, DINOHead(384, k)).train()
    crops = [torch.randn(b, 3, 224, 224) for _ in range(2)] + [torch.randn(b, 3, 96, 96) for _ in range(n_local)]
    measured = _saved_bytes(model, crops)
    if ckpt and backbone.rope_embed is not None:
        # not a saved tensor but as resident: each block's checkpoint keeps its RoPE tables
        # (an argument) alive for the recompute; fp32 cos + sin, (T, head dim) each
        tables = 1 + (depth - 1) * ("rope_rescale_coords" in VITS[name])
        measured += tables * 2 * 4 * 64 * sum(c.shape[0] * (1 + VITS[name]["num_register_tokens"] +
                                                            (c.shape[-1] // 16) ** 2) for c in crops)
    plan = memory_plan("vit_small", 16, k, batch_size_per_gpu=b, n_local=n_local, precision="fp32",
                       attention=attention, activation_checkpointing=ckpt, gpu_memory=80, backbone=backbone)
    assert plan.params_backbone == sum(p.numel() for p in backbone.parameters())
    assert plan.params_student == sum(p.numel() for p in model.parameters())
    assert plan.crops[0].tokens == 196 + 1 + VITS[name]["num_register_tokens"]
    estimate = b * (plan.activations_per_image() + plan.head_per_image) + plan.fixed_bytes
    assert estimate == pytest.approx(measured, rel=0.01)


def test_convnet_activations_match_saved_tensors_on_cpu():
    b, k = 2, 500
    backbone = build_convnet("resnet18")
    model = MultiCropWrapper(backbone, DINOHead(512, k)).train()
    crops = [torch.randn(b, 3, 64, 64) for _ in range(2)] + [torch.randn(b, 3, 32, 32) for _ in range(2)]
    measured = _saved_bytes(model, crops)
    plan = memory_plan("resnet18", 0, k, batch_size_per_gpu=b, n_global=2, n_local=2, global_size=64, local_size=32,
                       precision="fp32", gpu_memory=80, backbone=backbone)
    assert plan.params_backbone == sum(p.numel() for p in backbone.parameters())
    estimate = b * (plan.activations_per_image() + plan.head_per_image) + plan.fixed_bytes
    assert estimate == pytest.approx(measured, rel=0.02)
    assert plan.activations_per_image(True) == plan.activations_per_image(False)  # no checkpointing for convnets
    text = format_plan(plan)
    assert "resnet18 (convnet, 11.2 M parameters)" in text and "tokens" not in text.split("activations")[1]


@pytest.mark.parametrize("arch,over,backbone_params", [
    ("vit_7b", dict(patch_size=16, num_register_tokens=4, layerscale_init=1e-5, pos_embed="rope", qkv_bias=False),
     6_716_030_976),                                               # timm's vit_7b_patch16_dinov3 (no mask token)
    ("vit_giant2", dict(patch_size=14, num_register_tokens=4, layerscale_init=1e-5), None),
    ("resnet50", dict(), 23_508_032),                              # torchvision resnet50 without fc
])
def test_dry_run_builds_on_meta_and_plans(arch, over, backbone_params, capsys):
    from dino_fast.cli import main
    argv = ["train", "--arch", arch, "--dry_run", "true", "--gpu_memory", "80", "--data_path", "demo"]
    for k, v in over.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    if backbone_params:
        assert f"backbone {backbone_params:,}" in out
    assert "Memory plan per GPU" in out and "Largest micro-batch" in out
    from dino_fast.train.presets import resolve
    cfg = resolve(None, dict(arch=arch, data_path="demo", gpu_memory=80.0, **over))
    plan = memory_plan_from_config(cfg)
    with torch.device("meta"):
        from dino_fast.train.build import build_network
        student = build_network(cfg)
    assert plan.params_student == sum(p.numel() for p in student.parameters())


def test_reference_vit_plan_unchanged_by_the_model_path():
    """The meta-model path gives the table's numbers for a reference ViT."""
    with torch.device("meta"):
        backbone = dm.vit_base(8)
    kw = dict(batch_size_per_gpu=16, n_local=10, gpu_memory=80)
    a, b = memory_plan("vit_base", 8, 65536, **kw), memory_plan("vit_base", 8, 65536, backbone=backbone, **kw)
    assert a.state == b.state and a.crops == b.crops and a.params_student == b.params_student
