"""--activation_checkpointing false|full|selective: the same step (losses, gradients, student,
teacher after 2 steps, drop path on: the recompute replays the same draws), and what each mode
keeps for the backward.

What a forward keeps alive for its backward is measured as the CPU allocator's net bytes over
the forward (torch.profiler with profile_memory: allocations minus frees, the output excluded):
that counts what autograd saves, what the checkpoint keeps (its inputs) and what the selective
policy caches, which outer saved-tensor hooks cannot all see (a checkpointed region packs its
tensors through its own hooks). none > selective > full, and the memory plan
(dino_fast.runtime.memory, used by --dry_run) predicts each to within 1 %."""
from __future__ import annotations

import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dino_fast.model import DINOHead, MultiCropWrapper
from dino_fast.model.checkpointing import checkpoint_mode, is_saved_op
from dino_fast.model.vit import vit_small, vit_tiny
from dino_fast.runtime.memory import format_plan, memory_plan
from tests._step_options import batches, compare, make_state, run_steps


def retained_bytes(model, crops) -> tuple[int, int]:
    """(net bytes allocated by the forward minus its output, tensors packed by outer saved-tensor hooks)."""
    gc.collect()
    packed = [0]

    def pack(t):
        packed[0] += 1
        return t
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(crops)
    net = sum(e.self_cpu_memory_usage for e in prof.events()) - out.numel() * out.element_size()
    out.sum().backward()   # the graph is usable
    return net, packed[0]


def _tiny(mode):
    torch.manual_seed(0)
    m = vit_tiny(patch_size=4, depth=2, attention="sdpa", drop_path_rate=0.1, activation_checkpointing=mode).train()
    return m, [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]


def test_selective_keeps_less_than_none_and_more_than_full():
    (none, n_none), (sel, n_sel), (full, n_full) = (retained_bytes(*_tiny(m)) for m in (False, "selective", "full"))
    assert none > sel > full > 0, (none, sel, full)
    # fp32, D = 192, 2 blocks, 4 x 65 + 4 x 17 tokens: selective keeps the block input, qkv, the
    # attention output, proj, fc1 and fc2 outputs (+ the log-sum-exp): 11 D + 3 floats per token
    assert sel - full == pytest.approx(2 * 328 * (10 * 192 + 3) * 4, rel=0.02)
    # outer hooks see every saved tensor without checkpointing, only those outside the blocks with it
    assert n_none > n_sel >= n_full > 0


@pytest.mark.parametrize("attention,mode", [("sdpa", False), ("sdpa", "full"), ("sdpa", "selective"),
                                            ("math", "selective")])
def test_memory_plan_knows_each_mode(attention, mode):
    depth, b, k, n_local = 2, 2, 1000, 3
    torch.manual_seed(0)
    model = MultiCropWrapper(vit_small(16, depth=depth, attention=attention, drop_path_rate=0.1,
                                       activation_checkpointing=mode), DINOHead(384, k)).train()
    crops = [torch.randn(b, 3, 224, 224) for _ in range(2)] + [torch.randn(b, 3, 96, 96) for _ in range(n_local)]
    measured, _ = retained_bytes(model, crops)
    plan = memory_plan("vit_small", 16, k, depth=depth, batch_size_per_gpu=b, n_local=n_local, precision="fp32",
                       attention=attention, activation_checkpointing=mode, gpu_memory=80)
    estimate = b * (plan.activations_per_image() + plan.head_per_image) + plan.fixed_bytes
    assert estimate == pytest.approx(measured, rel=0.01)


def test_plan_orders_modes_and_prints_them():
    plan = memory_plan("vit_base", 8, 65536, batch_size_per_gpu=32, n_local=10, gpu_memory=80)
    none, full, sel = (plan.activations_per_image(m) for m in (False, "full", "selective"))
    assert none > sel > full
    # bf16 autocast, ViT-B: 24 D + 4 H bytes per token and block against 36 D + 16 + 4 H (+ 2 D sdpa)
    assert plan.max_micro_batch("full") > plan.max_micro_batch("selective") > plan.max_micro_batch(False)
    assert f"{plan.max_micro_batch('selective')} with --activation_checkpointing selective" in format_plan(plan)


def test_policy_saves_matmuls_and_attention_only():
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default,
               aten._scaled_dot_product_efficient_attention.default):
        assert is_saved_op(op), op
    for op in (aten.gelu.default, aten.native_layer_norm.default, aten.add.Tensor, aten.mul.Tensor,
               aten.cat.default, aten._softmax.default, aten.index_add.default):
        assert not is_saved_op(op), op


def test_modes_parse():
    assert [checkpoint_mode(v) for v in (False, True, "false", "full", "selective", "on")] == \
        [False, "full", False, "full", "selective", "full"]
    with pytest.raises(ValueError, match="--activation_checkpointing 'some': choose false, full or selective"):
        checkpoint_mode("some")


@pytest.mark.parametrize("mode,efficient", [("selective", False), ("full", False), ("selective", True)])
def test_checkpointed_step_equals_plain_step(mode, efficient):
    torch.set_num_threads(1)
    over = dict(drop_path_rate=0.2, efficient_drop_path=efficient)
    plain, ckpt = make_state(**over), make_state(activation_checkpointing=mode, **over)
    assert ckpt.student.backbone.checkpointing == mode and ckpt.teacher.backbone.checkpointing is False
    torch.manual_seed(5)
    lp = run_steps(plain, batches())
    torch.manual_seed(5)
    lc = run_steps(ckpt, batches())
    compare(plain, ckpt, lp, lc)
