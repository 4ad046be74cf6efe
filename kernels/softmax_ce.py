"""Fused cross-entropy of student crops against given teacher probabilities
(the DINO loss on CLS tokens and the iBOT loss on masked patch tokens of
DINOv2 / DINOv3).

Math
----
Student crops s < S, teacher crops i < T, batch index b < B (an image for the
CLS loss, a masked token for iBOT), K prototypes; rows crop-major: student row
s*B + b, teacher row i*B + b. x = student / tau_s, log p = x - lse(x), q the
teacher probabilities (rows need not sum to exactly 1). With per-b weights w
(1 for the CLS loss, 1/(masked patches of the token's image) for iBOT) and a
global scale:

    loss = scale * sum_b w_b sum_s sum_{i paired with s} -<q_ib, log p_sb>

Every student crop is paired with every teacher crop (DINOv2, DINOv3) or,
with ignore_diagonal, not with the teacher crop of the same index (DINOv3's
global-crop option). With Q_sb = sum_{i paired with s} q_ib and its mass
m_sb = sum_k Q_sbk,

    sum_{i paired} -<q_ib, log p_sb> = m_sb * lse_sb - <Q_sb, x_sb>
    d loss / d student_sbk = scale * w_b * (m_sb p_sbk - Q_sbk) / tau_s

so each student row needs one lse and one dot product with Q_sb, read once;
Q_b = sum_i q_ib is formed from the teacher tile of b once for all its
student crops (Q_sb = Q_b, or Q_b - q_sb for the paired crop s = i). DINOv2
instead recomputes log_softmax per student crop and materialises every
(B, K) product t * lsm of the double loop.

The teacher is either an fp32 probability tensor (DINOv2's API hands these
over) or a `SoftmaxTeacher` (kernels/softmax_teacher.py): its logits t,
per-prototype shift and per-row lse, with q = exp(t / tau_t + shift - lse)
recomputed in the tile -- the softmax-centred and the Sinkhorn-Knopp teacher
are both of this form, so their probabilities are never written to memory.

Kernels and memory traffic (student S*B*K*e_s bytes, teacher T*B*K*e_t)
----------------------------------------------------------------------
1. `_ce_fwd_kernel`, grid (B, K chunks): a program owns batch index b and a
   column chunk for ALL crops, [crops, BLOCK_K] tiles: the teacher tile of b
   read once, Q formed, the student tiles read once: online (max, sum-exp,
   entropy sum) and <Q_s, x_s>, m_s per (row, chunk). The "paired" student
   crops s < T sit in a tile aligned with the teacher tile (their Q_s needs
   q_s), the others in a second tile (Q_s = Q).
2. `_ce_finish_kernel`: student lse and mass per row (kept for the backward),
   per-program sums of w (m lse - <Q, x>) and of the entropies; `_ce_loss_kernel`
   (one program) adds them in a fixed order. Deterministic, no atomics. Tiny.
3. `_ce_grad_kernel`, same grid as 1, in the BACKWARD: reads the student and
   teacher tiles again and writes grad_output * scale * w (m p - Q) / tau_s in
   the student's dtype (grad_output read on the device: no host sync).
Forward + backward: student read twice + gradient written once (3 S B K e_s),
teacher read twice (2 T B K e_t); with a given fp32 probability tensor e_t = 4
and the probabilities had to be written first (by the caller), with a
SoftmaxTeacher e_t is the logits' dtype and nothing was written. As in
kernels/dino_loss.py the gradient is written in the backward, not the
forward, so applying grad_output costs no extra pass.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dino_fast.kernels.dino_loss import _combine_chunks, _online_update
from dino_fast.kernels.softmax_teacher import (DTYPES, H100_SMS, SoftmaxTeacher, cdiv, chunking, num_sms,
                                               resolve_impl)
from dino_fast.kernels.spec import KernelSpec

logger = logging.getLogger(__name__)

STAT_NAMES = ("student_entropy",)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _teacher_tile(t_ptr, shift_ptr, t_off, lse_t, t_ok, cols, col_ok, inv_tt, IMPLICIT: tl.constexpr):
    """q of the teacher rows on a [BLOCK_T, BLOCK_K] tile (0 on padding):
    loaded (fp32 probabilities) or recomputed from the logits (IMPLICIT)."""
    mask = t_ok[:, None] & col_ok[None, :]
    q = tl.load(t_ptr + t_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IMPLICIT:
        sh = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)                 # fp32, L2-resident
        q = tl.exp(tl.where(mask, q * inv_tt + sh[None, :] - lse_t[:, None], float("-inf")))   # 0 on padding
    return q


@triton.jit
def _store_part(part_ptr, rows, ok, j, n_chunks, stride, m, l, a, cross, mass):
    off = rows * n_chunks + j
    tl.store(part_ptr + off, m, mask=ok)
    tl.store(part_ptr + stride + off, l, mask=ok)
    tl.store(part_ptr + 2 * stride + off, a, mask=ok)
    tl.store(part_ptr + 3 * stride + off, cross, mask=ok)
    tl.store(part_ptr + 4 * stride + off, mass, mask=ok)


@triton.jit
def _ce_fwd_kernel(s_ptr, t_ptr, shift_ptr, lse_t_ptr, part_ptr, B, K, n_s, n_t, diag, chunk, n_chunks,
                   inv_ts, inv_tt, IMPLICIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.arange(0, BLOCK_T)
    t_ok = i < n_t
    g_ok = t_ok & (i < n_s)                    # student crops aligned with teacher crop i
    g_rows = i * B + b                         # row of crop i in the student and the teacher matrix
    g_off = g_rows.to(tl.int64) * K            # int64: rows*K may pass 2^31
    if IMPLICIT:
        lse_t = tl.load(lse_t_ptr + g_rows, mask=t_ok, other=0.0)
    else:
        lse_t = tl.zeros([BLOCK_T], tl.float32)
    mg = tl.full([BLOCK_T], -1.0e30, tl.float32)
    lg = tl.zeros([BLOCK_T], tl.float32)
    ag = tl.zeros([BLOCK_T], tl.float32)
    cg = tl.zeros([BLOCK_T], tl.float32)      # <Q_s, x_s>
    wg = tl.zeros([BLOCK_T], tl.float32)      # sum_k Q_s
    if BLOCK_L > 0:
        u = tl.arange(0, BLOCK_L)
        o_ok = u < n_s - n_t                   # the other student crops
        o_rows = (n_t + u) * B + b
        o_off = o_rows.to(tl.int64) * K
        mo = tl.full([BLOCK_L], -1.0e30, tl.float32)
        lo = tl.zeros([BLOCK_L], tl.float32)
        ao = tl.zeros([BLOCK_L], tl.float32)
        co = tl.zeros([BLOCK_L], tl.float32)
        wo = tl.zeros([BLOCK_L], tl.float32)
    k_start = j * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        q = _teacher_tile(t_ptr, shift_ptr, g_off, lse_t, t_ok, cols, col_ok, inv_tt, IMPLICIT)
        Q = tl.sum(q, 0)
        gmask = g_ok[:, None] & col_ok[None, :]
        xg = tl.load(s_ptr + g_off[:, None] + cols[None, :], mask=gmask, other=0.0).to(tl.float32) * inv_ts
        Qg = tl.where(gmask, Q[None, :] - diag * q, 0.0)       # diag = 1: pair (s, s) skipped
        cg += tl.sum(Qg * xg, 1)
        wg += tl.sum(Qg, 1)
        mg, lg, ag = _online_update(mg, lg, ag, xg, gmask)
        if BLOCK_L > 0:
            omask = o_ok[:, None] & col_ok[None, :]
            xo = tl.load(s_ptr + o_off[:, None] + cols[None, :], mask=omask, other=0.0).to(tl.float32) * inv_ts
            co += tl.sum(Q[None, :] * xo, 1)
            wo += tl.sum(Q, 0)
            mo, lo, ao = _online_update(mo, lo, ao, xo, omask)
    stride = n_s * B * n_chunks
    _store_part(part_ptr, g_rows, g_ok, j, n_chunks, stride, mg, lg, ag, cg, wg)
    if BLOCK_L > 0:
        _store_part(part_ptr, o_rows, o_ok, j, n_chunks, stride, mo, lo, ao, co, wo)


@triton.jit
def _ce_finish_kernel(part_ptr, w_ptr, lse_s_ptr, mass_ptr, psum_ptr, B, n_rows, n_chunks, has_w,
                      BLOCK_RF: tl.constexpr, BLOCK_CH: tl.constexpr):
    # rows p*BLOCK_RF ...: student lse and mass (for the backward); sums of the
    # weighted loss terms w (m lse - <Q, x>) and of the entropies over these rows
    p = tl.program_id(0)
    rows = p * BLOCK_RF + tl.arange(0, BLOCK_RF)
    ok = rows < n_rows
    M, l, a = _combine_chunks(part_ptr, rows, n_rows, n_chunks, BLOCK_RF, BLOCK_CH)
    chs = tl.arange(0, BLOCK_CH)
    cmask = ok[:, None] & (chs < n_chunks)[None, :]
    base = rows[:, None] * n_chunks + chs[None, :]
    stride = n_rows * n_chunks
    cross = tl.sum(tl.load(part_ptr + 3 * stride + base, mask=cmask, other=0.0), 1)
    mass = tl.sum(tl.load(part_ptr + 4 * stride + base, mask=cmask, other=0.0), 1)
    log_l = tl.log(l)
    lse = M + log_l
    tl.store(lse_s_ptr + rows, lse, mask=ok)
    tl.store(mass_ptr + rows, mass, mask=ok)
    w = tl.load(w_ptr + rows % B, mask=ok & (has_w != 0), other=1.0)
    tl.store(psum_ptr + 2 * p, tl.sum(tl.where(ok, w * (mass * lse - cross), 0.0), 0))
    tl.store(psum_ptr + 2 * p + 1, tl.sum(tl.where(ok, log_l - a / l, 0.0), 0))


@triton.jit
def _ce_loss_kernel(psum_ptr, loss_ptr, stats_ptr, n_p, n_rows, scale, BLOCK: tl.constexpr):
    """One program: the per-program sums of the finish kernel, in a fixed order."""
    acc_ce = tl.zeros([BLOCK], tl.float32)
    acc_h = tl.zeros([BLOCK], tl.float32)
    for p0 in range(0, n_p, BLOCK):
        idx = p0 + tl.arange(0, BLOCK)
        ok = idx < n_p
        acc_ce += tl.load(psum_ptr + 2 * idx, mask=ok, other=0.0)
        acc_h += tl.load(psum_ptr + 2 * idx + 1, mask=ok, other=0.0)
    tl.store(loss_ptr, scale * tl.sum(acc_ce, 0))
    tl.store(stats_ptr, tl.sum(acc_h, 0) / (n_rows * 1.0))


@triton.jit
def _ce_grad_kernel(s_ptr, t_ptr, shift_ptr, lse_t_ptr, lse_s_ptr, mass_ptr, w_ptr, grad_ptr, go_ptr, coef,
                    B, K, n_s, n_t, diag, has_w, chunk, inv_ts, inv_tt, IMPLICIT: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.arange(0, BLOCK_T)
    t_ok = i < n_t
    g_ok = t_ok & (i < n_s)
    g_rows = i * B + b
    g_off = g_rows.to(tl.int64) * K
    if IMPLICIT:
        lse_t = tl.load(lse_t_ptr + g_rows, mask=t_ok, other=0.0)
    else:
        lse_t = tl.zeros([BLOCK_T], tl.float32)
    lse_g = tl.load(lse_s_ptr + g_rows, mask=g_ok, other=0.0)
    mass_g = tl.load(mass_ptr + g_rows, mask=g_ok, other=0.0)
    w = tl.load(w_ptr + b, mask=has_w != 0, other=1.0)
    scale = tl.load(go_ptr).to(tl.float32) * coef * w            # grad_output * scale * w / tau_s
    if BLOCK_L > 0:
        u = tl.arange(0, BLOCK_L)
        o_ok = u < n_s - n_t
        o_rows = (n_t + u) * B + b
        o_off = o_rows.to(tl.int64) * K
        lse_o = tl.load(lse_s_ptr + o_rows, mask=o_ok, other=0.0)
        mass_o = tl.load(mass_ptr + o_rows, mask=o_ok, other=0.0)
    k_start = j * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        q = _teacher_tile(t_ptr, shift_ptr, g_off, lse_t, t_ok, cols, col_ok, inv_tt, IMPLICIT)
        Q = tl.sum(q, 0)
        gmask = g_ok[:, None] & col_ok[None, :]
        goffs = g_off[:, None] + cols[None, :]
        pg = tl.exp(tl.load(s_ptr + goffs, mask=gmask, other=0.0).to(tl.float32) * inv_ts - lse_g[:, None])
        dg = scale * (mass_g[:, None] * pg - (Q[None, :] - diag * q))
        tl.store(grad_ptr + goffs, dg.to(grad_ptr.dtype.element_ty), mask=gmask)
        if BLOCK_L > 0:
            omask = o_ok[:, None] & col_ok[None, :]
            ooffs = o_off[:, None] + cols[None, :]
            po = tl.exp(tl.load(s_ptr + ooffs, mask=omask, other=0.0).to(tl.float32) * inv_ts - lse_o[:, None])
            do = scale * (mass_o[:, None] * po - Q[None, :])
            tl.store(grad_ptr + ooffs, do.to(grad_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------- launcher
# One source of truth for every configuration the launcher can pick; the
# launcher and compile_specs() both read these.
TILE_ELEMS = 3072               # max logits per loop iteration (student + teacher tiles, fp32 registers)
BLOCK_TS = (1, 2)               # padded teacher crops (T <= 2: DINOv2 / DINOv3 use 2 global crops)
BLOCK_LS = (0, 8, 16, 32)       # padded other student crops (S - T <= 32; 0: none)
NUM_WARPS = 8
NUM_STAGES = 2
FINISH_CFG = dict(BLOCK_RF=32, BLOCK_CH=64, num_warps=4, num_stages=1)
LOSS_CFG = dict(BLOCK=128, num_warps=4, num_stages=1)


def triton_supports(n_s: int, n_t: int) -> bool:
    return n_t <= BLOCK_TS[-1] and max(n_s - n_t, 0) <= BLOCK_LS[-1]


def tile_config(block_t: int, block_l: int) -> dict:
    """BLOCK_K of the fwd / grad kernels: the teacher tile and the paired
    student tile (BLOCK_T rows each) plus the other student tile (BLOCK_L rows)
    hold at most TILE_ELEMS logits."""
    block_k = TILE_ELEMS // (2 * block_t + block_l)
    block_k = min(4096, max(32, 1 << (block_k.bit_length() - 1)))      # power of two
    return dict(BLOCK_T=block_t, BLOCK_L=block_l, BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _tile_config_for(n_s: int, n_t: int) -> dict:
    if not triton_supports(n_s, n_t):
        raise ValueError(f"softmax_ce: impl='triton' supports <= {BLOCK_TS[-1]} teacher crops and <= "
                         f"{BLOCK_LS[-1]} more student crops than teacher crops (got {n_s} student, {n_t} "
                         "teacher crops); use impl='torch'")
    block_t = next(x for x in BLOCK_TS if x >= n_t)
    block_l = next(x for x in BLOCK_LS if x >= max(n_s - n_t, 0))
    return tile_config(block_t, block_l)


def _plan(B: int, K: int, n_s: int, n_t: int, n_sm: int) -> dict:
    cfg = _tile_config_for(n_s, n_t)
    chunk, n_chunks = chunking(K, B, cfg["BLOCK_K"], n_sm)
    return dict(cfg=cfg, chunk=chunk, n_chunks=n_chunks, n_f=cdiv(n_s * B, FINISH_CFG["BLOCK_RF"]))


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The non-tensor arguments of one loss evaluation."""
    B: int
    n_s: int
    n_t: int
    diag: bool
    scale: float
    student_temp: float
    inv_tt: float          # teacher 1/temperature (implicit teacher), 0 otherwise
    implicit: bool
    impl: str


def _triton_forward(student, t, shift, lse_t, weights, pb: _Problem):
    """Kernels 1-3. Returns loss (0-dim), stats (1,), lse_s, mass (S*B,) -- fp32, on the device."""
    SB, K = student.shape                      # (S*B, K)
    dev = student.device
    f32 = dict(dtype=torch.float32, device=dev)
    plan = _plan(pb.B, K, pb.n_s, pb.n_t, num_sms(dev))
    cfg = plan["cfg"]
    dummy = student.new_empty(1, dtype=torch.float32)
    part = torch.empty((5, SB, plan["n_chunks"]), **f32)
    _ce_fwd_kernel[(pb.B, plan["n_chunks"])](
        s_ptr=student, t_ptr=t, shift_ptr=dummy if shift is None else shift,
        lse_t_ptr=dummy if lse_t is None else lse_t, part_ptr=part, B=pb.B, K=K, n_s=pb.n_s, n_t=pb.n_t,
        diag=float(pb.diag), chunk=plan["chunk"], n_chunks=plan["n_chunks"], inv_ts=1.0 / pb.student_temp,
        inv_tt=pb.inv_tt, IMPLICIT=pb.implicit, BLOCK_T=cfg["BLOCK_T"], BLOCK_L=cfg["BLOCK_L"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    lse_s = torch.empty(SB, **f32)
    mass = torch.empty(SB, **f32)
    psum = torch.empty((plan["n_f"], 2), **f32)
    cfg = FINISH_CFG
    _ce_finish_kernel[(plan["n_f"],)](
        part_ptr=part, w_ptr=dummy if weights is None else weights, lse_s_ptr=lse_s, mass_ptr=mass,
        psum_ptr=psum, B=pb.B, n_rows=SB, n_chunks=plan["n_chunks"], has_w=int(weights is not None),
        BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    loss = torch.empty((), **f32)
    stats = torch.empty(1, **f32)
    cfg = LOSS_CFG
    _ce_loss_kernel[(1,)](psum_ptr=psum, loss_ptr=loss, stats_ptr=stats, n_p=plan["n_f"], n_rows=SB,
                          scale=pb.scale, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    return loss, stats, lse_s, mass


def _triton_grad(student, t, shift, lse_t, weights, lse_s, mass, grad_output, pb: _Problem):
    """Kernel 4: grad_output * d loss / d student, in the student's dtype."""
    SB, K = student.shape
    plan = _plan(pb.B, K, pb.n_s, pb.n_t, num_sms(student.device))
    cfg = plan["cfg"]
    dummy = student.new_empty(1, dtype=torch.float32)
    grad = torch.empty_like(student)           # (S*B, K)
    _ce_grad_kernel[(pb.B, plan["n_chunks"])](
        s_ptr=student, t_ptr=t, shift_ptr=dummy if shift is None else shift,
        lse_t_ptr=dummy if lse_t is None else lse_t, lse_s_ptr=lse_s, mass_ptr=mass,
        w_ptr=dummy if weights is None else weights, grad_ptr=grad, go_ptr=grad_output,
        coef=pb.scale / pb.student_temp, B=pb.B, K=K, n_s=pb.n_s, n_t=pb.n_t, diag=float(pb.diag),
        has_w=int(weights is not None), chunk=plan["chunk"], inv_ts=1.0 / pb.student_temp, inv_tt=pb.inv_tt,
        IMPLICIT=pb.implicit, BLOCK_T=cfg["BLOCK_T"], BLOCK_L=cfg["BLOCK_L"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return grad


# --------------------------------------------------------------------------- torch impl (same algebra)
def _torch_q(t, shift, lse_t, pb: _Problem):
    """Teacher probabilities (T, B, K) fp32."""
    q = (t.float() * pb.inv_tt + shift - lse_t[:, None]).exp() if pb.implicit else t.float()
    return q.view(pb.n_t, pb.B, -1)


def _torch_forward(student, t, shift, lse_t, weights, pb: _Problem):
    q = _torch_q(t, shift, lse_t, pb)                                   # (T, B, K)
    x = (student.float() * (1.0 / pb.student_temp)).view(pb.n_s, pb.B, -1)   # (S, B, K)
    M = x.amax(-1, keepdim=True)
    e = (x - M).exp()
    l = e.sum(-1)
    lse_s = M[..., 0] + l.log()                                         # (S, B)
    ent_s = l.log() - (e * (x - M)).sum(-1) / l
    Q = q.sum(0)                                                        # (B, K)
    cross = (x * Q).sum(-1)                                             # (S, B)
    mass = Q.sum(-1).expand(pb.n_s, pb.B).clone()
    if pb.diag:
        d = min(pb.n_s, pb.n_t)
        cross[:d] -= (x[:d] * q[:d]).sum(-1)
        mass[:d] -= q[:d].sum(-1)
    w = 1.0 if weights is None else weights
    loss = pb.scale * (w * (mass * lse_s - cross)).sum()
    return loss, ent_s.mean().view(1), lse_s.reshape(-1), mass.reshape(-1)


def _torch_grad(student, t, shift, lse_t, weights, lse_s, mass, grad_output, pb: _Problem):
    q = _torch_q(t, shift, lse_t, pb)
    p = (student.float() * (1.0 / pb.student_temp) - lse_s[:, None]).exp().view(pb.n_s, pb.B, -1)
    g = mass.view(pb.n_s, pb.B, 1) * p - q.sum(0)                      # (S, B, K)
    if pb.diag:
        d = min(pb.n_s, pb.n_t)
        g[:d] += q[:d]
    coef = grad_output.float() * (pb.scale / pb.student_temp)
    if weights is not None:
        g *= weights[:, None]
    return (g * coef).view(student.shape).to(student.dtype)


# --------------------------------------------------------------------------- autograd
def _adjacent(parts: Sequence[torch.Tensor]) -> bool:
    """True where the (rows, K) tensors lie back to back in one storage (e.g.
    the chunks of one tensor), so they can be read as one matrix without a copy."""
    first = parts[0]
    if not all(p.is_contiguous() and p.dtype == first.dtype and p.device == first.device for p in parts):
        return False
    if any(p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for p in parts):
        return False
    offset = first.data_ptr()
    for p in parts:
        if p.data_ptr() != offset:
            return False
        offset += p.numel() * p.element_size()
    return True


def _joined(parts: tuple[torch.Tensor, ...], K: int) -> torch.Tensor:
    """The student crops as one (S*B, K) matrix; the parts are adjacent (`_adjacent`)."""
    if len(parts) == 1:
        return parts[0].view(-1, K)
    rows = sum(p.numel() // K for p in parts)
    return torch.as_strided(parts[0], (rows, K), (K, 1))


class _SoftmaxCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pb, t, shift, lse_t, weights, *students):
        K = t.shape[-1]
        student = _joined(students, K)
        fwd = _triton_forward if pb.impl == "triton" else _torch_forward
        loss, stats, lse_s, mass = fwd(student, t, shift, lse_t, weights, pb)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        ctx.pb, ctx.K = pb, K
        ctx.save_for_backward(t, shift, lse_t, weights, lse_s, mass, *students)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        n_in = len(ctx.needs_input_grad) - 5
        if grad_loss is None or not any(ctx.needs_input_grad[5:]):
            return (None,) * (5 + n_in)
        t, shift, lse_t, weights, lse_s, mass, *students = ctx.saved_tensors
        student = _joined(tuple(students), ctx.K)
        grad_fn = _triton_grad if ctx.pb.impl == "triton" else _torch_grad
        grad = grad_fn(student, t, shift, lse_t, weights, lse_s, mass, grad_loss.float().contiguous(), ctx.pb)
        grads, row = [], 0
        for s in students:                      # views of the one gradient buffer, no copy
            n = s.numel() // ctx.K
            grads.append(grad[row:row + n].view(s.shape))
            row += n
        return (None,) * 5 + tuple(grads)


# --------------------------------------------------------------------------- functional entry point
def _crops(x, name: str) -> tuple[list[torch.Tensor], int, int]:
    """A (crops, B, K) tensor or a sequence of crops (each (..., K), B rows) ->
    ([per-crop (B, K) tensors], B, K)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"softmax_ce: {name} must be (crops, B, K) or a sequence of (B, K) crops, got "
                             f"shape {tuple(x.shape)}")
        parts = list(x.unbind(0))
    else:
        parts = [p.reshape(-1, p.shape[-1]) for p in x]
    if not parts:
        raise ValueError(f"softmax_ce: {name} has no crop; pass at least one")
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"softmax_ce: every crop of {name} must have the same (B, K) shape, got {sorted(shapes)}")
    return parts, parts[0].shape[0], parts[0].shape[1]


def _student_inputs(student, parts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The autograd inputs holding the student crops back to back: the (S, B, K)
    tensor itself, the crops where they are adjacent chunks of one tensor (read
    in place), else their concatenation (a differentiable copy)."""
    if isinstance(student, torch.Tensor):
        return (student.contiguous(),)
    if _adjacent(parts):
        return tuple(parts)
    logger.debug("softmax_ce: student crops are not adjacent in memory; concatenating them")
    return (torch.cat(parts),)


def softmax_ce(student, teacher, *, student_temp: float = 0.1, ignore_diagonal: bool = False,
               weights: torch.Tensor | None = None, scale: float = 1.0, impl: str = "auto",
               return_stats: bool = False):
    """Cross-entropy of student crops against teacher probabilities over crop pairs.

    loss = scale * sum_b w_b sum_s sum_{i paired with s} -<q_ib, log_softmax(student_sb / student_temp)>

    student: (S, B, K) logits or a sequence of S crops of B rows each (chunks of
      one tensor are read in place; others are concatenated), fp32 / bf16 /
      fp16, differentiable.
    teacher: (T, B, K) probabilities, a sequence of T such crops, or a
      `SoftmaxTeacher` with T*B rows (crop-major); never differentiated.
    ignore_diagonal: skip the pairs (s, s) for s < min(S, T).
    weights: optional (B,) per-batch-index weights (iBOT: 1 / masked patches of
      the token's image). scale: the global factor (DINOv3: 1 / (B * pairs)).
    impl: "auto" (Triton on CUDA tensors where the crop counts fit, else torch),
      "triton" or "torch" (the same algebra in PyTorch).
    Returns the fp32 0-dim loss; with return_stats also {"student_entropy": the
    mean entropy of the student softmax over its rows}. No host sync.
    """
    s_parts, B, K = _crops(student, "student")
    n_s = len(s_parts)
    dt = s_parts[0].dtype
    if dt not in DTYPES:
        raise ValueError(f"softmax_ce: student logits must be float32, bfloat16 or float16, got {dt}")
    if isinstance(teacher, SoftmaxTeacher):
        t = teacher.logits
        if t.dim() != 2 or t.shape[1] != K or (B and t.shape[0] % B) or (not B and t.shape[0]):
            raise ValueError(f"softmax_ce: the SoftmaxTeacher's logits {tuple(t.shape)} must be (T*B, K) for "
                             f"student crops of shape {(B, K)}")
        n_t = t.shape[0] // B if B else 1
        shift, lse_t, inv_tt = teacher.shift.contiguous(), teacher.lse.contiguous(), teacher.inv_temp
    else:
        t_parts, tB, tK = _crops(teacher, "teacher")
        if (tB, tK) != (B, K):
            raise ValueError(f"softmax_ce: teacher crops {(tB, tK)} and student crops {(B, K)} must have the "
                             "same shape")
        n_t = len(t_parts)
        t_parts = [p.detach() for p in t_parts]
        t = _joined(tuple(t_parts), K) if _adjacent(t_parts) else torch.cat(t_parts)
        shift = lse_t = None
        inv_tt = 0.0
    if weights is not None and weights.numel() != B:
        raise ValueError(f"softmax_ce: weights must have B={B} elements (one per batch index), got "
                         f"{tuple(weights.shape)}")
    if B == 0:
        loss = sum(p.sum() for p in s_parts) * 0.0                      # keeps the graph
        return (loss, {"student_entropy": loss.detach()}) if return_stats else loss
    requested = impl
    impl = resolve_impl(impl, s_parts[0], "softmax_ce")
    if impl == "triton" and not triton_supports(n_s, n_t):
        if requested == "triton":
            _tile_config_for(n_s, n_t)                                  # raises, naming the limits
        impl = "torch"
    t = t.detach().reshape(n_t * B, K).contiguous()
    implicit = shift is not None
    if implicit and t.dtype != dt:
        # the declared kernels read teacher logits in the student's dtype: write q instead
        logger.debug("softmax_ce: teacher logits %s != student %s; materialising q", t.dtype, dt)
        t = SoftmaxTeacher(t, shift, lse_t, inv_tt).materialize(impl)
        shift = lse_t = None
        inv_tt, implicit = 0.0, False
    elif not implicit and t.dtype != torch.float32:
        t = t.float()
    if weights is not None:
        weights = weights.detach().float().reshape(B).contiguous()
    pb = _Problem(B=B, n_s=n_s, n_t=n_t, diag=bool(ignore_diagonal), scale=float(scale),
                  student_temp=float(student_temp), inv_tt=float(inv_tt), implicit=implicit, impl=impl)
    loss, stats = _SoftmaxCEFunction.apply(pb, t, shift, lse_t, weights, *_student_inputs(student, s_parts))
    if return_stats:
        return loss, dict(zip(STAT_NAMES, stats.unbind(0)))
    return loss


# --------------------------------------------------------------------------- plain reference
def softmax_ce_reference(student, teacher, *, student_temp: float = 0.1, ignore_diagonal: bool = False,
                         weights: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """The same loss written the obvious way (DINOv2's double loop):
    log_softmax per student crop, one (B, K) product per crop pair. student
    (S, B, K) logits, teacher (T, B, K) probabilities."""
    total = 0
    for s_idx, s in enumerate(student):
        lsm = F.log_softmax(s.float() / student_temp, dim=-1)
        for t_idx, q in enumerate(teacher):
            if ignore_diagonal and s_idx == t_idx:
                continue
            ce = -torch.sum(q * lsm, dim=-1)                             # (B,)
            total = total + (ce if weights is None else ce * weights).sum()
    return total * scale


# --------------------------------------------------------------------------- compile specs
def compile_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, configuration) the launcher can pick. The student
    dtype is fp32 / bf16 / fp16; the teacher is fp32 probabilities or
    (IMPLICIT) logits in the student's dtype. problem = programs launched for
    DINOv3's CLS loss: B = 64, 2 + 8 crops, K = 262144, on an H100."""
    B, K = 64, 262144
    specs = []
    for s_name in DTYPES.values():
        for implicit in (False, True):
            t_name = s_name if implicit else "fp32"
            dtype = f"{s_name}<-{t_name}" if implicit else f"{s_name}<-probs"
            for block_t in BLOCK_TS:
                for block_l in BLOCK_LS:
                    cfg = tile_config(block_t, block_l)
                    ce = dict(IMPLICIT=implicit, BLOCK_T=block_t, BLOCK_L=block_l, BLOCK_K=cfg["BLOCK_K"])
                    _, nch = chunking(K, B, cfg["BLOCK_K"], H100_SMS)
                    prob = dict(B=B, K=K, grid=B * nch)
                    common = dict(s_ptr=f"*{s_name}", t_ptr=f"*{t_name}", shift_ptr="*fp32", lse_t_ptr="*fp32")
                    tail = dict(IMPLICIT="constexpr", BLOCK_T="constexpr", BLOCK_L="constexpr",
                                BLOCK_K="constexpr")
                    specs.append(KernelSpec(
                        "softmax_ce_fwd", _ce_fwd_kernel,
                        dict(common, part_ptr="*fp32", B="i32", K="i32", n_s="i32", n_t="i32", diag="fp32",
                             chunk="i32", n_chunks="i32", inv_ts="fp32", inv_tt="fp32", **tail),
                        ce, cfg["num_warps"], cfg["num_stages"], dtype, prob))
                    specs.append(KernelSpec(
                        "softmax_ce_grad", _ce_grad_kernel,
                        dict(common, lse_s_ptr="*fp32", mass_ptr="*fp32", w_ptr="*fp32", grad_ptr=f"*{s_name}",
                             go_ptr="*fp32", coef="fp32", B="i32", K="i32", n_s="i32", n_t="i32", diag="fp32",
                             has_w="i32", chunk="i32", inv_ts="fp32", inv_tt="fp32", **tail),
                        ce, cfg["num_warps"], cfg["num_stages"], dtype, prob))
    cfg = FINISH_CFG
    rows = 10 * B
    specs.append(KernelSpec(
        "softmax_ce_finish", _ce_finish_kernel,
        dict(part_ptr="*fp32", w_ptr="*fp32", lse_s_ptr="*fp32", mass_ptr="*fp32", psum_ptr="*fp32", B="i32",
             n_rows="i32", n_chunks="i32", has_w="i32", BLOCK_RF="constexpr", BLOCK_CH="constexpr"),
        dict(BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"]), cfg["num_warps"], cfg["num_stages"], "fp32",
        dict(B=B, K=K, grid=cdiv(rows, cfg["BLOCK_RF"]))))
    cfg = LOSS_CFG
    specs.append(KernelSpec(
        "softmax_ce_loss", _ce_loss_kernel,
        dict(psum_ptr="*fp32", loss_ptr="*fp32", stats_ptr="*fp32", n_p="i32", n_rows="i32", scale="fp32",
             BLOCK="constexpr"),
        dict(BLOCK=cfg["BLOCK"]), cfg["num_warps"], cfg["num_stages"], "fp32", dict(B=B, K=K, grid=1)))
    # K (and chunk, a multiple of BLOCK_K) divisible by 16 compiles an aligned
    # variant of the K-sweeping kernels at launch: declare it too
    sweeping = ("softmax_ce_fwd", "softmax_ce_grad")
    specs += [dataclasses.replace(s, divisible_by_16=("K", "chunk")) for s in specs if s.name in sweeping]
    return specs


__all__ = ["softmax_ce", "softmax_ce_reference", "compile_specs", "STAT_NAMES", "SoftmaxTeacher"]
