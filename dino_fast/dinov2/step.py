"""One optimizer step of the dinov2 method (DINOv2's `forward_backward` +
its train loop body; DINOv3's with Gram anchoring): schedules → masks →
teacher → teacher probabilities → student → losses → backward → clip → step
→ EMA, with no host synchronisation: the masks are drawn on the host
(masking.py) and copied to the device, the schedules are host arrays, the
loss comes back as a device tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .masking import sample_masks, step_rng


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (total L2 norm, coefficient max_norm / (norm + 1e-6) clamped at 1)
    without reading the norm on the host; sharded gradients: norms all-reduced (optim.grad_norms)."""
    from dino_fast.train.optim import _local, grad_norms
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    total = grad_norms(params).square().sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([_local(p.grad) for p in params], coef.to(params[0].grad.dtype))
    return total


def clip_per_module(student, max_norm: float) -> None:
    """DINOv2 clips each student sub-network on its own: backbone, DINO head, iBOT head."""
    for part in (student.backbone, student.head, student.ibot_head):
        if part is not None:
            clip_grad_norm_(list(part.parameters()), max_norm)


def dinov2_train_step(st, crops: list[torch.Tensor], it: int, epoch: int) -> torch.Tensor:
    """One step at global iteration `it` on [2 global crops, local crops]; returns the 0-dim loss."""
    cfg, obj, sched = st.cfg, st.dino_loss, st.schedules
    sched.set_optimizer(st.optimizer, it)
    st.optimizer.zero_grad(set_to_none=True)
    globals_, B = crops[:2], crops[0].shape[0]
    p = cfg.patch_size
    grid = (globals_[0].shape[-2] // p, globals_[0].shape[-1] // p)
    device = globals_[0].device

    # ---- masks of the 2B global-crop images (host RNG of (seed, it, rank)) ----
    mb = None
    if cfg.ibot_loss_weight > 0 and cfg.mask_sample_probability > 0:
        mb = sample_masks(2 * B, grid, cfg.mask_ratio_min_max, cfg.mask_sample_probability,
                          rng=step_rng(cfg.seed, it, _rank())).to(device)
        if mb.n_masked == 0:
            mb = None
    masks = [mb.masks[:B], mb.masks[B:]] + [None] * (len(crops) - 2) if mb is not None else None
    indices = mb.indices if mb is not None else None
    temp = float(sched.teacher_temp[it])
    gram = obj.gram
    gram_w = float(sched.gram_weight[it]) if gram is not None else 0.0
    gram_on = gram is not None and gram.active(it) and gram_w > 0
    if gram is not None and gram.refresh_due(it):
        gram.refresh(st.teacher.backbone)

    with st.autocast():
        from dino_fast.train.compile import mark_step
        mark_step(cfg)   # --cuda_graph_teacher: a new CUDA-graph generation per step, as the DINO step
        # ---- teacher: global crops, unmasked; heads on CLS and on the student's masked positions ----
        with torch.no_grad():
            t = st.teacher(globals_, mask_indices=indices)
            q_dino = obj.teacher_dino(t["global_logits"], temp)                  # 2B rows
            q_ibot = obj.teacher_ibot(t["patch_logits"], temp) if mb is not None else None
            targets = gram.targets(globals_, grid) if gram_on else None          # (2B, N, D)
        # ---- student: all crops packed, the global crops' masked patches = mask token ----
        s = st.student(crops, masks=masks, mask_indices=indices)
        g_loss = None
        if gram_on:
            from .gram import gram_loss
            g_loss = gram_loss(s["global_patches"], targets, img_level=gram.img_level)
        loss = obj(s, q_dino, q_ibot, mb, 2 * B, gram=g_loss, gram_weight=gram_w)
    (st.scaler.scale(loss) if st.scaler is not None else loss).backward()

    # ---- step: (unscale) → clip per sub-network → optimizer (last layer frozen by its lr schedule) → EMA ----
    from dino_fast.train.step import update
    update(st, it, lambda: clip_per_module(st.student, cfg.clip_grad) if cfg.clip_grad else None)
    return loss.detach()
