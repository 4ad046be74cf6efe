"""Memory plan: parameter counts against the real model, the activation model against the
tensors autograd actually saves (CPU), monotonicity, max-batch consistency, the OOM message,
and (GPU) the estimated peak against the measured one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dino_fast.model import DINOHead, MultiCropWrapper, vit_base, vit_small, vit_tiny
from dino_fast.runtime.memory import (GiB, MiB, TrainingOutOfMemoryError, format_plan, head_param_count,
                                    memory_plan, memory_plan_from_config, oom_error, replan, vit_param_count)
from tests.conftest import requires_cuda

FACTORIES = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}
WIDTH = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


def _count(arch, patch, out_dim, depth=12, **head_kw):
    with torch.device("meta"):
        backbone = FACTORIES[arch](patch, depth=depth)
        head = DINOHead(WIDTH[arch], out_dim, **head_kw)
    params = list(backbone.parameters()) + list(head.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("arch, patch", [("vit_small", 16), ("vit_base", 8)])
def test_parameter_count_equals_model(arch, patch):
    total, trainable = _count(arch, patch, 65536)
    plan = memory_plan(arch, patch, 65536, gpu_memory=80)
    assert plan.params_student == plan.params_teacher == total
    assert plan.params_trainable == trainable           # weight_g frozen (norm_last_layer)


def test_parameter_count_hand_values():
    # ViT-B/8: block 12*768^2 + 13*768 = 7,087,872; x12 = 85,054,464; patch 3*64*768 + 768 = 148,224;
    # cls 768; positions 785*768 = 602,880; final norm 1,536 -> 85,807,872.
    # head: 768*2048+2048 + 2048^2+2048 + 2048*256+256 + 65536*256 + 65536 = 23,138,560.
    assert vit_param_count("vit_base", 8) == 85_807_872
    assert head_param_count(768, 65536) == (23_138_560, 23_138_560 - 65536)
    plan = memory_plan("vit_base", 8, 65536, gpu_memory=80)
    assert plan.params_student == 108_946_432          # ViT-B/8 + head: 109 M parameters (as README)
    assert memory_plan("vit_small", 16, 65536, gpu_memory=80).params_student == 44_017_792


@pytest.mark.parametrize("kw", [dict(depth=4), dict(use_bn=True), dict(nlayers=1), dict(nlayers=4),
                                dict(norm_last_layer=False), dict(hidden_dim=512, bottleneck_dim=64)])
def test_parameter_count_variants(kw):
    depth = kw.pop("depth", 12)
    total, trainable = _count("vit_tiny", 16, 1000, depth=depth, **kw)
    plan = memory_plan("vit_tiny", 16, 1000, depth=depth, use_bn_in_head=kw.get("use_bn", False),
                       norm_last_layer=kw.get("norm_last_layer", True), head_nlayers=kw.get("nlayers", 3),
                       head_hidden_dim=kw.get("hidden_dim", 2048), head_bottleneck_dim=kw.get("bottleneck_dim", 256),
                       gpu_memory=80)
    assert (plan.params_student, plan.params_trainable) == (total, trainable)


# ----------------------------------------------------------------------------- activations vs autograd
def _saved_bytes(model, crops) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(crops)
    return sum(seen.values())


@pytest.mark.parametrize("attention, ckpt", [("sdpa", False), ("math", False), ("sdpa", True)])
def test_activation_model_matches_saved_tensors(attention, ckpt):
    """fp32 on CPU: the plan's per-image activations (backbone + head) and the last-layer weight
    equal what autograd saves for the real packed model, to within 1 %."""
    depth, b, k, n_local = 2, 2, 1000, 3
    model = MultiCropWrapper(vit_small(16, depth=depth, attention=attention, drop_path_rate=0.1,
                                       activation_checkpointing=ckpt), DINOHead(384, k)).train()
    crops = [torch.randn(b, 3, 224, 224) for _ in range(2)] + [torch.randn(b, 3, 96, 96) for _ in range(n_local)]
    measured = _saved_bytes(model, crops)
    plan = memory_plan("vit_small", 16, k, depth=depth, batch_size_per_gpu=b, n_local=n_local, precision="fp32",
                       attention=attention, activation_checkpointing=ckpt, gpu_memory=80)
    estimate = b * (plan.activations_per_image() + plan.head_per_image) + plan.fixed_bytes
    assert estimate == pytest.approx(measured, rel=0.01)


def test_vit_b8_activation_bytes_per_image():
    """ViT-B/8 bf16 autocast, sdpa, 2x224 + 10x96: per token and block (2*4 + 15*2)*768 bytes
    + 16 (LayerNorm stats) + 12*4 (log-sum-exp) = 29,248 B; 785 tokens x 12 blocks + the bf16
    crop 3*224^2*2 = 275,817,216 B per global crop; 145 tokens: 145*29,248*12 = 50,891,520 + 55,296 = 50,946,816 B
    per local crop. With checkpointing each block keeps its fp32 input: 785*768*4*12 + 301,056."""
    plan = memory_plan("vit_base", 8, 65536, batch_size_per_gpu=16, n_local=10, gpu_memory=80)
    glob, loc = plan.crops
    assert (glob.tokens, glob.saved, loc.tokens, loc.saved) == (785, 275_817_216, 145, 50_946_816)
    assert glob.saved_ckpt == 785 * 768 * 4 * 12 + 301_056
    assert plan.activations_per_image() == 2 * 275_817_216 + 10 * 50_946_816       # 1,061,102,592 B ~ 1012 MiB


# ----------------------------------------------------------------------------- plan properties
def test_monotonicity():
    base = memory_plan("vit_base", 8, 65536, batch_size_per_gpu=32, n_local=10, gpu_memory=80)
    ckpt = replan(base, activation_checkpointing=True)
    assert ckpt.activations_per_image() < base.activations_per_image() / 5
    assert ckpt.per_image_bytes() < base.per_image_bytes() and ckpt.max_micro_batch() > base.max_micro_batch()
    sharded = [replan(base, sharded=True, world_size=w).state_bytes for w in (1, 2, 8, 64)]
    # fp32 all-gathers and the autocast bf16 weight copies (unsharded) stay: ~1/3 at 64 GPUs
    assert sharded == sorted(sharded, reverse=True) and sharded[-1] < base.state_bytes / 3
    crops = [replan(base, n_local=n).per_image_bytes() for n in (0, 2, 6, 10)]
    assert crops == sorted(crops) and len(set(crops)) == 4
    assert replan(base, grad_accum_steps=4).estimated_peak_bytes < base.estimated_peak_bytes
    assert replan(base, precision="fp32").per_image_bytes() > base.per_image_bytes()
    assert replan(base, attention="math").per_image_bytes() > base.per_image_bytes()
    assert replan(base, optimizer="sgd").state_bytes < base.state_bytes
    assert replan(base, loss_impl="torch").loss_per_image > base.loss_per_image


@pytest.mark.parametrize("kw", [dict(), dict(activation_checkpointing=True), dict(sharded=True, world_size=8),
                                dict(gpu_memory_gib=12.0, n_local=6)])
def test_max_batch_is_consistent_with_the_plan(kw):
    plan = replan(memory_plan("vit_base", 8, 65536, n_local=10, gpu_memory=80), **kw)
    m = plan.max_micro_batch()
    assert m >= 1
    assert plan.peak_bytes(m) <= plan.usable_bytes < plan.peak_bytes(m + 1)
    assert replan(plan, batch_size_per_gpu=m).fits and not replan(plan, batch_size_per_gpu=m + 1).fits
    assert plan.usable_bytes == int(plan.gpu_memory_bytes * 0.9 - GiB)


def test_format_plan_table():
    plan = memory_plan("vit_base", 8, 65536, batch_size_per_gpu=64, world_size=8, sharded=True, n_local=10,
                       grad_accum_steps=2, gpu_memory=80)
    text = format_plan(plan)
    for s in ["vit_base/8", "FSDP2 over 8 GPUs", "2 micro-batches of 32", "student 108.95 M",
              "2 x global 224 px (785 tokens)", "10 x local 96 px (145 tokens)", "adamw state",
              "total per image", "Largest micro-batch per GPU that fits:",
              f"{plan.max_micro_batch(True)} with --activation_checkpointing", "80.0 GiB (given)"]:
        assert s in text, s


def test_plan_from_config_fields():
    cfg = SimpleNamespace(arch="vit_base", patch_size=8, out_dim=65536, batch_size_per_gpu=24, local_crops_number=10,
                          precision="bf16", use_fp16=False, activation_checkpointing=True, grad_accum_steps=2,
                          global_size=224, local_size=96, depth=0, use_bn_in_head=False, norm_last_layer=True,
                          head_hidden_dim=2048, head_bottleneck_dim=256, optimizer="adamw", attention="auto",
                          loss_impl="auto", gpu_memory=40.0, fsdp="auto")
    plan = memory_plan_from_config(cfg, world_size=4)
    x = plan.inputs
    assert x.sharded and x.world_size == 4 and x.activation_checkpointing and plan.micro_batch == 12
    assert x.gpu_memory_gib == 40.0 and x.n_local == 10 and x.depth == 12
    assert not memory_plan_from_config(cfg, world_size=1).inputs.sharded
    cfg.use_fp16 = True
    assert memory_plan_from_config(cfg).inputs.precision == "fp16"
    with pytest.raises(ValueError, match="unknown arch 'resnet50'"):
        memory_plan("resnet50", 16, 100)


# ----------------------------------------------------------------------------- OOM message
def test_oom_error_message_and_remedies():
    plan = memory_plan("vit_base", 8, 65536, batch_size_per_gpu=32, n_local=10, gpu_memory=24)
    assert not plan.fits
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.06 GiB. GPU 0 has a total capacity "
                                 "of 23.55 GiB of which 1.2 GiB is free.")
    err = oom_error(exc, plan)
    assert isinstance(err, TrainingOutOfMemoryError) and isinstance(err, RuntimeError)
    msg = str(err)
    assert "Tried to allocate 3.06 GiB" in msg
    assert f"estimated peak {plan.estimated_peak_bytes / GiB:.1f} GiB" in msg
    assert f"{plan.per_image_bytes() / MiB:.0f} MiB per image x 32" in msg
    assert f"largest micro-batch that fits: {plan.max_micro_batch()}" in msg
    # remedy 1: the suggested accumulation divides the batch and fits per the plan
    n = int(msg.split("--grad_accum_steps ")[2].split()[0])
    assert 32 % n == 0 and replan(plan, grad_accum_steps=n).fits and not replan(plan, grad_accum_steps=n // 2).fits
    # remedy 2: checkpointing with its numbers
    ck = replan(plan, activation_checkpointing=True)
    assert "--activation_checkpointing true" in msg and f"largest micro-batch {ck.max_micro_batch()}" in msg
    # remedy 3: the suggested local crop count is the largest that fits
    assert "--local_crops_number" in msg
    nl = int(msg.split("--local_crops_number ")[1].split()[0])
    assert replan(plan, n_local=nl).fits and not replan(plan, n_local=nl + 1).fits
    # a batch so large that even no local crops cannot fit says so
    big = str(oom_error(exc, replan(plan, batch_size_per_gpu=64)))
    assert "even --local_crops_number 0 does not fit micro-batch 64" in big


def test_oom_error_when_the_plan_expected_a_fit():
    plan = memory_plan("vit_small", 16, 65536, batch_size_per_gpu=32, n_local=8, gpu_memory=80)
    assert plan.fits
    msg = str(oom_error(RuntimeError("CUDA out of memory."), plan))
    assert "expected this to fit" in msg and "expandable_segments" in msg
    n = int(msg.split("--grad_accum_steps ")[2].split()[0])  # aims 25 % under the estimate
    assert 32 % n == 0 and replan(plan, grad_accum_steps=n).estimated_peak_bytes <= 0.75 * plan.estimated_peak_bytes
    nl = int(msg.split("--local_crops_number ")[1].split()[0])
    assert replan(plan, n_local=nl).estimated_peak_bytes <= 0.75 * plan.estimated_peak_bytes
    ck = str(oom_error(RuntimeError("oom"), replan(plan, activation_checkpointing=True)))
    assert "already on" in ck
    cfg = SimpleNamespace(arch="vit_small", patch_size=16, out_dim=4096, batch_size_per_gpu=8, local_crops_number=0)
    assert "No local crops" in str(oom_error(RuntimeError("oom"), cfg=cfg))
    # no plan, or a config the plan cannot read: still the OOM with the remedies, never a second error
    for bare in (oom_error(RuntimeError("CUDA out of memory."), None),
                 oom_error(RuntimeError("CUDA out of memory."), cfg=SimpleNamespace(arch="resnet50"))):
        assert isinstance(bare, TrainingOutOfMemoryError)
        assert all(s in str(bare) for s in ("--grad_accum_steps", "--activation_checkpointing", "--local_crops_number"))


# ----------------------------------------------------------------------------- GPU: estimate vs measured
@requires_cuda
@pytest.mark.parametrize("ckpt", [False, True])
def test_estimate_matches_measured_peak_on_gpu(ckpt):
    from dino_fast.losses.dino_loss import DINOLoss
    dev = torch.device("cuda")
    b, k, n_local = 32, 65536, 4
    student = MultiCropWrapper(vit_small(16, drop_path_rate=0.1, activation_checkpointing=ckpt),
                               DINOHead(384, k)).to(dev)
    teacher = MultiCropWrapper(vit_small(16), DINOHead(384, k)).to(dev)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DINOLoss(k, 2 + n_local, 0.04, 0.04, 0, 10).to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    crops = [torch.randn(b, 3, 224, 224, device=dev) for _ in range(2)]
    crops += [torch.randn(b, 3, 96, 96, device=dev) for _ in range(n_local)]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                t_out = teacher(crops[:2])
            loss = loss_fn(student(crops), t_out, 0)
        loss.backward()
        opt.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    plan = memory_plan("vit_small", 16, k, batch_size_per_gpu=b, n_local=n_local, precision="bf16",
                       activation_checkpointing=ckpt, attention=student.backbone.attention,
                       input_batches_in_flight=1)
    ratio = plan.estimated_peak_bytes / measured
    assert 0.8 <= ratio <= 1.2, (f"estimate {plan.estimated_peak_bytes / GiB:.2f} GiB vs measured "
                                 f"{measured / GiB:.2f} GiB\n{format_plan(plan)}")
