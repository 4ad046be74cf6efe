"""The FSDP2 teacher's root parameters (patch / position embeddings, CLS token, final
norm, the whole DINO head) follow the EMA on every supported torch (2 gloo processes).

torch < 2.8 keeps an FSDP2 root's gathered parameters after forward whatever
reshard_after_forward says; the teacher (no backward) would then run every later
forward on that stale copy. The test puts the teacher root into exactly that mode
(`set_reshard_after_forward(False)` on the root, what torch 2.6 / 2.7 do) and checks,
after a training step, that the teacher's root parameters equal the EMA formula
m·teacher + (1 − m)·student computed here, that the root is resharded after its
forward, and that the next teacher forward equals a plain unsharded teacher holding
the formula's weights. Without build.shard's explicit reshard (the hook removed) the
same forward runs on the stale copy: the check can fail. fp32: tolerance 1e-6.
"""
from __future__ import annotations

import os

import torch

from dino_fast.train import reshard
from tests._dist import run_distributed
from tests.test_default_path import make_state
from tests.test_grad_accum import fixed_batches, full

FP32 = dict(loss_impl="torch", ema_impl="triton", attention="sdpa", precision="fp32", cpu_autocast=False)


def _root_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if not n.startswith("backbone.blocks.")]


def _worker(rank, world, out_dir):
    from torch.distributed.tensor import DTensor

    from dino_fast.kernels.ema import ema_update_
    from dino_fast.train.step import train_step
    torch.set_num_threads(1)
    st = make_state(FP32, world, True)
    teacher = st.teacher
    teacher.set_reshard_after_forward(False, recurse=False)     # the root as torch 2.6 / 2.7 treat it
    crops = fixed_batches(2, rank, world)
    t0 = full(teacher.state_dict())
    train_step(st, crops[0], it=0, epoch=0)
    m = float(st.schedules.momentum[0])
    s1, t1 = full(st.student.state_dict()), full(teacher.state_dict())
    roots = _root_names(teacher)
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.norm.weight",
            "head.last_layer.weight_v"} <= set(roots), roots
    for n in roots:          # the EMA formula, computed here
        torch.testing.assert_close(t1[n], m * t0[n] + (1 - m) * s1[n], rtol=1e-6, atol=1e-7, msg=n)
    # resharded after the step's teacher forward: the next forward gathers the current shards
    root_params = dict(teacher.named_parameters())
    assert all(isinstance(root_params[n], DTensor) for n in roots)

    # the next teacher forward == a plain teacher with the formula's weights
    plain = _plain_teacher(st)
    plain.load_state_dict(t1)
    with torch.no_grad():
        out = teacher(crops[1][:2])
        want = plain(crops[1][:2])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)

    # the check can fail: without the explicit reshard the root keeps its gathered copy
    for key, hook in list(teacher._forward_hooks.items()):
        if hook is reshard._reshard_hook:
            del teacher._forward_hooks[key]
    with torch.no_grad():
        teacher(crops[1][:2])                                   # gathers, then keeps the root unsharded
        ema_update_(st.teacher_params, st.student_params, 0.0)  # teacher <- student: the shards change
        stale = teacher(crops[1][:2])
        plain.load_state_dict(full(st.student.state_dict()))
        fresh = plain(crops[1][:2])
    assert not torch.allclose(stale, fresh, rtol=1e-4, atol=1e-5)
    torch.save({"ok": True}, os.path.join(out_dir, f"ok{rank}.pt"))


def _plain_teacher(st):
    """An unsharded teacher of the same architecture, in the sharded one's mode."""
    from dino_fast.train.build import build_pair
    _, plain = build_pair(st.cfg)
    return plain.train(st.teacher.training)


def test_teacher_root_follows_ema_under_fsdp2(tmp_path):
    run_distributed(_worker, str(tmp_path), world_size=2)
    assert all(torch.load(tmp_path / f"ok{r}.pt", weights_only=True)["ok"] for r in range(2))
