"""Fused DINO loss (facebookresearch/dino's `DINOLoss` objective): Triton kernels,
their launchers, a torch twin of the same algebra, the autograd Function and the
functional `dino_loss(...)`. The training-side module (teacher-temperature
schedule, centre EMA and all-reduce) is `dino_fast.losses.dino_loss.DINOLoss`.

Math
----
Teacher views i < T (T = n_teacher_views, default 2), student views v < V
(V = ncrops), batch index b < B, K = out_dim. Rows are view-major:
student row v*B + b, teacher row i*B + b (the reference's `chunk`).

    x_t = (t - c) / tau_t        q_i = softmax(x_t)      (teacher, detached)
    x_s = s / tau_s              log p_v = x_s - lse_v   (student)
    loss = 1/(P*B) * sum_b sum_i sum_{v != i} -<q_ib, log p_vb>,
    P = T*V - min(T, V)          (pairs; v == i skipped as the reference)

With Q_v = sum_{i != v} q_i (= sum_i q_i - q_v if v < T) and m_v = T - [v < T]
(teacher views paired with v), sum_k Q_vk = m_v, so

    sum_i sum_{v != i} <q_i, log p_v> = sum_v <Q_v, x_v> - m_v * lse_v
    d loss / d s_vk = (m_v * p_vk - Q_vk) / (P * B * tau_s)

so every student row needs only its lse and one dot product with Q_v. The
teacher gets no gradient. Health statistics come from the same per-row sums:
H(q) = log l - a/l with l = sum e^(x-M), a = sum e^(x-M) (x-M) (M the row max),
likewise H(p); max_k q = 1/l; KL(q_i || p_v) summed over pairs = CE - sum_i n_i
H(q_i) with n_i = V - [i < V] (student views paired with i).

Kernels and memory traffic (S = V*B*K student logits)
----------------------------------------------------
1. `_teacher_stats_kernel`, grid (row groups of BLOCK_R, K chunks): one read
   of the teacher; per (row, chunk) online (max, sum-exp, shifted entropy sum)
   and per (row group, column) partial column sums of the raw logits.
2. `_teacher_finish_kernel`: combines the chunk partials into lse per teacher
   row (+ block sums of entropy and max prob) and reduces the column partials
   over groups in a fixed order -- deterministic center sums, no atomics. Tiny.
3. `_student_fwd_kernel`, grid (B, K chunks): a program owns batch index b and
   a column chunk for ALL views at once, [views, BLOCK_K] tiles: it reads the
   teacher tile of b once (q_i recomputed from t, c and lse_t), forms Q, then
   reads the student tiles once: online (max, sum-exp, entropy sum) and
   <Q_v, x_v> per (row, chunk).
4. `_student_finish_kernel`: student lse per row (kept for the backward) and
   block sums of the loss terms and entropies; `_loss_kernel` (one program)
   adds the block sums in a fixed order: loss, health statistics, |c|. Tiny.
5. `_student_grad_kernel`, same grid as 3, in the BACKWARD: reads the student
   and teacher tiles again and writes grad_output * (m_v p - Q_v)/(P B tau_s)
   in the input dtype.
Total for forward + backward: student read twice, gradient written once,
teacher read three times (kernels 1, 3, 5; the center is L2-resident), the
tiny fp32 partials aside. The student part is the floor for a loss whose
gradient needs the full-row lse; at B=64, K=65536, V=12, T=2 in fp32 that is
3 * 201 MB + 3 * 34 MB = 0.70 GB (bf16: half); the bench counts exactly these
bytes (floor "student 2R+1W, teacher 3R").

Why the gradient is written in the backward: writing it in the forward
(Liger-style) costs the same two reads + one write there, but the backward
must then read and write it again to apply grad_output (2 S more) unless it
syncs the host to test grad_output == 1. Here the backward reads grad_output
from device memory inside kernel 5. `grad_in_forward=True` gives the
Liger-style variant (buffer written in the forward, scaled in the backward).
All accumulation is fp32; offsets of rows are int64.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

from dino_fast.kernels.spec import KernelSpec

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "torch")
# The health statistics `_loss_kernel` writes to stats[0..4] (and the torch twin stacks),
# in this order: the one list of their names, used by every module that reads them.
STAT_NAMES = ("teacher_entropy", "student_entropy", "kl", "teacher_max_prob", "center_norm")


# --------------------------------------------------------------------------- kernels
@triton.jit
def _online_update(m, l, a, x, mask):
    """Fold a [R, BLOCK_K] tile x (masked entries ignored) into the per-row
    running max m, sum-exp l = sum e^(x-m) and a = sum e^(x-m) (x-m)."""
    m_new = tl.maximum(m, tl.max(tl.where(mask, x, float("-inf")), 1))
    alpha = tl.exp(m - m_new)                  # rescale of the old sums (m starts at -1e30: no inf - inf)
    shift = m_new - m
    xs = tl.where(mask, x - m_new[:, None], 0.0)
    e = tl.where(mask, tl.exp(xs), 0.0)
    a = alpha * (a - shift * l) + tl.sum(e * xs, 1)
    l = alpha * l + tl.sum(e, 1)
    return m_new, l, a


@triton.jit
def _chunk_range(j, chunk, K):
    """Columns [k_start, k_end) of K chunk j."""
    k_start = j * chunk
    return k_start, tl.minimum(k_start + chunk, K)


@triton.jit
def _online_start(BLOCK: tl.constexpr):
    """Empty running (max, sum-exp, shifted entropy sum) of BLOCK rows for `_online_update`."""
    return (tl.full([BLOCK], -1.0e30, tl.float32), tl.zeros([BLOCK], tl.float32),
            tl.zeros([BLOCK], tl.float32))


@triton.jit
def _teacher_stats_kernel(t_ptr, c_ptr, part_ptr, colpart_ptr, n_rows, K, chunk, n_chunks, inv_tt,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(0)                       # row group
    j = tl.program_id(1)                       # column chunk
    rows = g * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    row_off = rows.to(tl.int64) * K            # int64: rows*K may pass 2^31
    col_base = g.to(tl.int64) * K
    m, l, a = _online_start(BLOCK_R)
    k_start, k_end = _chunk_range(j, chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        mask = row_ok[:, None] & col_ok[None, :]
        t = tl.load(t_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)                     # fp32 center
        tl.store(colpart_ptr + col_base + cols, tl.sum(t, 0), mask=col_ok)    # center sums
        m, l, a = _online_update(m, l, a, (t - c[None, :]) * inv_tt, mask)
    off = rows * n_chunks + j
    stride = n_rows * n_chunks
    tl.store(part_ptr + off, m, mask=row_ok)
    tl.store(part_ptr + stride + off, l, mask=row_ok)
    tl.store(part_ptr + 2 * stride + off, a, mask=row_ok)


@triton.jit
def _combine_chunks(part_ptr, rows, n_rows, n_chunks, BLOCK_RF: tl.constexpr, BLOCK_CH: tl.constexpr):
    """Merge the per-chunk (max, sum-exp, entropy sum) of rows into (M, l, a)."""
    chs = tl.arange(0, BLOCK_CH)
    mask = (rows < n_rows)[:, None] & (chs < n_chunks)[None, :]
    off = rows[:, None] * n_chunks + chs[None, :]
    stride = n_rows * n_chunks
    mj = tl.load(part_ptr + off, mask=mask, other=-1.0e30)
    lj = tl.load(part_ptr + stride + off, mask=mask, other=0.0)
    aj = tl.load(part_ptr + 2 * stride + off, mask=mask, other=0.0)
    M = tl.max(mj, 1)
    d = mj - M[:, None]
    w = tl.exp(d)
    l = tl.where(rows < n_rows, tl.sum(lj * w, 1), 1.0)      # 1 on padding rows: no log(0)
    return M, l, tl.sum(w * (aj + d * lj), 1)


@triton.jit
def _teacher_finish_kernel(part_ptr, colpart_ptr, c_ptr, lse_ptr, tsum_ptr, colsum_ptr,
                           B, ncrops, n_rows, n_chunks, n_groups, K,
                           BLOCK_RF: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    # rows p*BLOCK_RF ...: lse per teacher row; sums of entropy, pair-weighted
    # entropy (n_i = V - [i < V]) and max prob over these rows
    rows = p * BLOCK_RF + tl.arange(0, BLOCK_RF)
    row_ok = rows < n_rows
    M, l, a = _combine_chunks(part_ptr, rows, n_rows, n_chunks, BLOCK_RF, BLOCK_CH)
    log_l = tl.log(l)
    tl.store(lse_ptr + rows, M + log_l, mask=row_ok)
    ent = tl.where(row_ok, log_l - a / l, 0.0)
    n_i = (ncrops - ((rows // B) < ncrops).to(tl.int32)).to(tl.float32)
    tl.store(tsum_ptr + 4 * p, tl.sum(ent, 0))
    tl.store(tsum_ptr + 4 * p + 1, tl.sum(n_i * ent, 0))
    tl.store(tsum_ptr + 4 * p + 2, tl.sum(tl.where(row_ok, 1.0 / l, 0.0), 0))     # max_k q = 1/l
    # columns p*BLOCK_C ...: column sums over the row groups (fixed order), |c|^2
    cols = p * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < K
    acc = tl.zeros([BLOCK_C], tl.float32)
    ptrs = colpart_ptr + cols                  # advanced by K per group: 64-bit pointer arithmetic
    for _g in range(0, n_groups):
        acc += tl.load(ptrs, mask=col_ok, other=0.0)
        ptrs += K
    tl.store(colsum_ptr + cols, acc, mask=col_ok)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    tl.store(tsum_ptr + 4 * p + 3, tl.sum(c * c, 0))


@triton.jit
def _teacher_q_tile(t_ptr, c_ptr, lse_t, t_off, t_ok, cols, col_ok, inv_tt):
    """q_i of the teacher views on a [BLOCK_T, BLOCK_K] tile (0 on padding)
    and Q = sum_i q_i."""
    tmask = t_ok[:, None] & col_ok[None, :]
    t = tl.load(t_ptr + t_off[:, None] + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)                         # fp32 center
    q = tl.where(tmask, tl.exp((t - c[None, :]) * inv_tt - lse_t[:, None]), 0.0)
    return q, tl.sum(q, 0)


@triton.jit
def _store_part(part_ptr, rows, ok, j, n_chunks, stride, m, l, a, cross):
    off = rows * n_chunks + j
    tl.store(part_ptr + off, m, mask=ok)
    tl.store(part_ptr + stride + off, l, mask=ok)
    tl.store(part_ptr + 2 * stride + off, a, mask=ok)
    tl.store(part_ptr + 3 * stride + off, cross, mask=ok)


# The student kernels split the views of batch index b in two tiles: the
# "paired" views v = i < min(T, V) that share the teacher tile's layout (their
# Q_v = Q - q_v) and the "other" views v = T + u (Q_v = Q), so the teacher tile
# is only BLOCK_T rows high.
@triton.jit
def _view_rows(b, B, K, ncrops, n_tv, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    """Rows of batch index b: teacher views i (t_ok), the student views paired with them
    (g_ok; same rows g_rows, int64 offsets g_off), the other student views (o_ok, o_rows, o_off)."""
    i = tl.arange(0, BLOCK_T)
    t_ok = i < n_tv
    g_ok = t_ok & (i < ncrops)                 # student views paired with teacher view i
    g_rows = i * B + b                         # row of view i in the teacher and the student matrix
    g_off = g_rows.to(tl.int64) * K            # int64: rows*K may pass 2^31
    u = tl.arange(0, BLOCK_L)
    o_ok = u < ncrops - n_tv                   # the other student views
    o_rows = (n_tv + u) * B + b
    o_off = o_rows.to(tl.int64) * K
    return t_ok, g_ok, g_rows, g_off, o_ok, o_rows, o_off


@triton.jit
def _student_fwd_kernel(s_ptr, t_ptr, c_ptr, lse_t_ptr, part_ptr, B, K, ncrops, n_tv, chunk, n_chunks,
                        inv_ts, inv_tt, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    t_ok, g_ok, g_rows, g_off, o_ok, o_rows, o_off = _view_rows(b, B, K, ncrops, n_tv, BLOCK_T, BLOCK_L)
    lse_t = tl.load(lse_t_ptr + g_rows, mask=t_ok, other=0.0)
    mg, lg, ag = _online_start(BLOCK_T)
    cg = tl.zeros([BLOCK_T], tl.float32)      # <Q_v, x_v>
    mo, lo, ao = _online_start(BLOCK_L)
    co = tl.zeros([BLOCK_L], tl.float32)
    k_start, k_end = _chunk_range(j, chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        q, Q = _teacher_q_tile(t_ptr, c_ptr, lse_t, g_off, t_ok, cols, col_ok, inv_tt)
        gmask = g_ok[:, None] & col_ok[None, :]
        xg = tl.load(s_ptr + g_off[:, None] + cols[None, :], mask=gmask, other=0.0).to(tl.float32) * inv_ts
        cg += tl.sum((Q[None, :] - q) * xg, 1)                   # 0 on masked entries
        mg, lg, ag = _online_update(mg, lg, ag, xg, gmask)
        omask = o_ok[:, None] & col_ok[None, :]
        xo = tl.load(s_ptr + o_off[:, None] + cols[None, :], mask=omask, other=0.0).to(tl.float32) * inv_ts
        co += tl.sum(Q[None, :] * xo, 1)
        mo, lo, ao = _online_update(mo, lo, ao, xo, omask)
    stride = ncrops * B * n_chunks
    _store_part(part_ptr, g_rows, g_ok, j, n_chunks, stride, mg, lg, ag, cg)
    _store_part(part_ptr, o_rows, o_ok, j, n_chunks, stride, mo, lo, ao, co)


@triton.jit
def _student_finish_kernel(part_ptr, lse_s_ptr, ssum_ptr, B, n_rows, n_tv, n_chunks,
                           BLOCK_RF: tl.constexpr, BLOCK_CH: tl.constexpr):
    # rows p*BLOCK_RF ...: student lse (for the backward); sums of the loss
    # terms m_v lse_v - <Q_v, x_v> and of the entropies over these rows
    p = tl.program_id(0)
    rows = p * BLOCK_RF + tl.arange(0, BLOCK_RF)
    row_ok = rows < n_rows
    M, l, a = _combine_chunks(part_ptr, rows, n_rows, n_chunks, BLOCK_RF, BLOCK_CH)
    chs = tl.arange(0, BLOCK_CH)
    cross = tl.sum(tl.load(part_ptr + 3 * n_rows * n_chunks + rows[:, None] * n_chunks + chs[None, :],
                           mask=row_ok[:, None] & (chs < n_chunks)[None, :], other=0.0), 1)
    log_l = tl.log(l)
    lse = M + log_l
    tl.store(lse_s_ptr + rows, lse, mask=row_ok)
    m_v = (n_tv - ((rows // B) < n_tv).to(tl.int32)).to(tl.float32)   # teacher views paired with v
    tl.store(ssum_ptr + 2 * p, tl.sum(tl.where(row_ok, m_v * lse - cross, 0.0), 0))
    tl.store(ssum_ptr + 2 * p + 1, tl.sum(tl.where(row_ok, log_l - a / l, 0.0), 0))


@triton.jit
def _loss_kernel(tsum_ptr, ssum_ptr, loss_ptr, stats_ptr, n_t, n_s, n_trows, n_srows, n_pairs, B,
                 BLOCK: tl.constexpr):
    """One program: the per-program sums of the finish kernels, in a fixed
    order, into the loss and the health statistics."""
    acc_ce = tl.zeros([BLOCK], tl.float32)
    acc_hs = tl.zeros([BLOCK], tl.float32)
    for p0 in range(0, n_s, BLOCK):
        idx = p0 + tl.arange(0, BLOCK)
        ok = idx < n_s
        acc_ce += tl.load(ssum_ptr + 2 * idx, mask=ok, other=0.0)
        acc_hs += tl.load(ssum_ptr + 2 * idx + 1, mask=ok, other=0.0)
    acc_ht = tl.zeros([BLOCK], tl.float32)
    acc_htw = tl.zeros([BLOCK], tl.float32)
    acc_mp = tl.zeros([BLOCK], tl.float32)
    acc_cn = tl.zeros([BLOCK], tl.float32)
    for p0 in range(0, n_t, BLOCK):
        idx = p0 + tl.arange(0, BLOCK)
        ok = idx < n_t
        acc_ht += tl.load(tsum_ptr + 4 * idx, mask=ok, other=0.0)
        acc_htw += tl.load(tsum_ptr + 4 * idx + 1, mask=ok, other=0.0)
        acc_mp += tl.load(tsum_ptr + 4 * idx + 2, mask=ok, other=0.0)
        acc_cn += tl.load(tsum_ptr + 4 * idx + 3, mask=ok, other=0.0)
    denom = n_pairs * B * 1.0
    loss = tl.sum(acc_ce, 0) / denom
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, tl.sum(acc_ht, 0) / (n_trows * 1.0))
    tl.store(stats_ptr + 1, tl.sum(acc_hs, 0) / (n_srows * 1.0))
    tl.store(stats_ptr + 2, loss - tl.sum(acc_htw, 0) / denom)       # KL = CE - pair-weighted H(q)
    tl.store(stats_ptr + 3, tl.sum(acc_mp, 0) / (n_trows * 1.0))
    tl.store(stats_ptr + 4, tl.sqrt(tl.sum(acc_cn, 0)))


@triton.jit
def _student_grad_kernel(s_ptr, t_ptr, c_ptr, lse_t_ptr, lse_s_ptr, grad_ptr, go_ptr, coef,
                         B, K, ncrops, n_tv, chunk, inv_ts, inv_tt,
                         BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    t_ok, g_ok, g_rows, g_off, o_ok, o_rows, o_off = _view_rows(b, B, K, ncrops, n_tv, BLOCK_T, BLOCK_L)
    lse_t = tl.load(lse_t_ptr + g_rows, mask=t_ok, other=0.0)
    lse_g = tl.load(lse_s_ptr + g_rows, mask=g_ok, other=0.0)
    lse_o = tl.load(lse_s_ptr + o_rows, mask=o_ok, other=0.0)
    scale = tl.load(go_ptr).to(tl.float32) * coef                 # grad_output / (P*B*tau_s)
    k_start, k_end = _chunk_range(j, chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        gmask = g_ok[:, None] & col_ok[None, :]
        q, Q = _teacher_q_tile(t_ptr, c_ptr, lse_t, g_off, t_ok, cols, col_ok, inv_tt)
        # paired views: m_v = T - 1, Q_v = Q - q_v
        goffs = g_off[:, None] + cols[None, :]
        pg = tl.exp(tl.load(s_ptr + goffs, mask=gmask, other=0.0).to(tl.float32) * inv_ts - lse_g[:, None])
        dg = scale * ((n_tv - 1) * pg - (Q[None, :] - q))
        tl.store(grad_ptr + goffs, dg.to(grad_ptr.dtype.element_ty), mask=gmask)
        # other views: m_v = T, Q_v = Q
        omask = o_ok[:, None] & col_ok[None, :]
        ooffs = o_off[:, None] + cols[None, :]
        po = tl.exp(tl.load(s_ptr + ooffs, mask=omask, other=0.0).to(tl.float32) * inv_ts - lse_o[:, None])
        do = scale * (n_tv * po - Q[None, :])
        tl.store(grad_ptr + ooffs, do.to(grad_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------- launcher
# One source of truth for every configuration the launcher can pick; the
# launcher and compile_specs() both read these.
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TILE_ELEMS = 3072              # max logits per loop iteration of the student kernels (fp32 registers)
_STUDENT_BLOCK_T = (2, 4)        # padded teacher views (T <= 4)
_STUDENT_BLOCK_L = (2, 4, 8, 16, 32)   # padded other student views (ncrops - T <= 32)
_STUDENT_WARPS = 8
# Measured with `dino-fast kernels`: at BLOCK_K=256 the bf16 forward for
# (T=2, L=8) -- the default 2 + 8 crops -- spills 12 B/thread on sm_90a when K
# is a multiple of 16 (48 registers; a ptxas quirk, 128 and 512 do not spill).
_BLOCK_K_CAP = {(2, 8): 128}
_STUDENT_STAGES = 2
_TEACHER_CFG = dict(BLOCK_R=16, BLOCK_K=128, num_warps=8, num_stages=2)
_TEACHER_FINISH_CFG = dict(BLOCK_RF=64, BLOCK_CH=64, BLOCK_C=1024, num_warps=8, num_stages=1)
_STUDENT_FINISH_CFG = dict(BLOCK_RF=32, BLOCK_CH=64, num_warps=4, num_stages=1)
_LOSS_CFG = dict(BLOCK=128, num_warps=4, num_stages=1)
_MAX_CHUNKS = _TEACHER_FINISH_CFG["BLOCK_CH"]   # partials per row the finish kernels merge
_PROGRAMS_PER_SM = 8            # target programs per SM when splitting K into chunks
_H100_SMS = 132                 # for the compile specs' problem description


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int, allowed: tuple) -> int | None:
    return next((x for x in allowed if x >= n), None)


def _triton_supports(ncrops: int, n_tv: int) -> bool:
    return (_pow2_at_least(n_tv, _STUDENT_BLOCK_T) is not None
            and _pow2_at_least(ncrops - n_tv, _STUDENT_BLOCK_L) is not None)


def _student_config(block_t: int, block_l: int) -> dict:
    """Tile of the student kernels: BLOCK_K columns of BLOCK_T paired + BLOCK_L
    other student rows and BLOCK_T teacher rows, at most _TILE_ELEMS logits (the
    same for every dtype: they live in fp32 registers)."""
    block_k = _TILE_ELEMS // (block_l + 2 * block_t)
    block_k = min(4096, max(32, 1 << (block_k.bit_length() - 1)))      # power of two
    block_k = _BLOCK_K_CAP.get((block_t, block_l), block_k)
    return dict(BLOCK_T=block_t, BLOCK_L=block_l, BLOCK_K=block_k,
                num_warps=_STUDENT_WARPS, num_stages=_STUDENT_STAGES)


def _student_config_for(ncrops: int, n_tv: int) -> dict:
    if not _triton_supports(ncrops, n_tv):
        raise ValueError(f"dino_loss: impl='triton' supports n_teacher_views <= {_STUDENT_BLOCK_T[-1]} and "
                         f"ncrops - n_teacher_views <= {_STUDENT_BLOCK_L[-1]} (got ncrops={ncrops}, "
                         f"n_teacher_views={n_tv}); use impl='torch'")
    return _student_config(_pow2_at_least(n_tv, _STUDENT_BLOCK_T),
                           _pow2_at_least(max(ncrops - n_tv, 0), _STUDENT_BLOCK_L))


def _chunking(K: int, n_row_programs: int, block_k: int, n_sm: int) -> tuple[int, int]:
    """Split K into n_chunks chunks of `chunk` columns (a multiple of block_k)
    so that n_row_programs * n_chunks ~ _PROGRAMS_PER_SM * n_sm."""
    target = max(1, _PROGRAMS_PER_SM * n_sm // max(1, n_row_programs))
    n_tiles = _cdiv(K, block_k)
    n_chunks = max(1, min(target, n_tiles, _MAX_CHUNKS))
    chunk = _cdiv(n_tiles, n_chunks) * block_k
    return chunk, _cdiv(K, chunk)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2      # interpreter: few chunks, but more than one where K allows


def _plan(B: int, K: int, ncrops: int, n_tv: int, n_sm: int) -> dict:
    """Grids and chunking of every kernel for one problem."""
    cfg_t = _TEACHER_CFG
    groups = _cdiv(n_tv * B, cfg_t["BLOCK_R"])
    chunk_t, nch_t = _chunking(K, groups, cfg_t["BLOCK_K"], n_sm)
    cfg_s = _student_config_for(ncrops, n_tv)
    chunk_s, nch_s = _chunking(K, B, cfg_s["BLOCK_K"], n_sm)
    n_tf = max(_cdiv(n_tv * B, _TEACHER_FINISH_CFG["BLOCK_RF"]), _cdiv(K, _TEACHER_FINISH_CFG["BLOCK_C"]))
    n_sf = _cdiv(ncrops * B, _STUDENT_FINISH_CFG["BLOCK_RF"])
    return dict(groups=groups, chunk_t=chunk_t, nch_t=nch_t, cfg_s=cfg_s, chunk_s=chunk_s, nch_s=nch_s,
                n_tf=n_tf, n_sf=n_sf, grid_t=(groups, nch_t), grid_s=(B, nch_s))


def _n_pairs(ncrops: int, n_tv: int) -> int:
    return n_tv * ncrops - min(n_tv, ncrops)


def _triton_forward(student, teacher, center, ncrops, n_tv, teacher_temp, student_temp):
    """Kernels 1-4 and the final reduction. Returns loss (0-dim), stats (5,),
    colsum (1, K), lse_t (T*B,), lse_s (ncrops*B,) -- all fp32, on the device."""
    VB, K = student.shape                      # (ncrops*B, K)
    B = VB // ncrops
    dev = student.device
    f32 = dict(dtype=torch.float32, device=dev)
    plan = _plan(B, K, ncrops, n_tv, _num_sms(dev))
    inv_tt, inv_ts = 1.0 / teacher_temp, 1.0 / student_temp
    rows_t = n_tv * B

    part_t = torch.empty((3, rows_t, plan["nch_t"]), **f32)
    colpart = torch.empty((plan["groups"], K), **f32)
    cfg = _TEACHER_CFG
    _teacher_stats_kernel[plan["grid_t"]](
        t_ptr=teacher, c_ptr=center, part_ptr=part_t, colpart_ptr=colpart, n_rows=rows_t, K=K,
        chunk=plan["chunk_t"], n_chunks=plan["nch_t"], inv_tt=inv_tt, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    lse_t = torch.empty(rows_t, **f32)
    tsum = torch.empty((plan["n_tf"], 4), **f32)
    colsum = torch.empty((1, K), **f32)
    cfg = _TEACHER_FINISH_CFG
    _teacher_finish_kernel[(plan["n_tf"],)](
        part_ptr=part_t, colpart_ptr=colpart, c_ptr=center, lse_ptr=lse_t, tsum_ptr=tsum, colsum_ptr=colsum,
        B=B, ncrops=ncrops, n_rows=rows_t, n_chunks=plan["nch_t"], n_groups=plan["groups"], K=K,
        BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    part_s = torch.empty((4, VB, plan["nch_s"]), **f32)
    cfg = plan["cfg_s"]
    _student_fwd_kernel[plan["grid_s"]](
        s_ptr=student, t_ptr=teacher, c_ptr=center, lse_t_ptr=lse_t, part_ptr=part_s, B=B, K=K, ncrops=ncrops,
        n_tv=n_tv, chunk=plan["chunk_s"], n_chunks=plan["nch_s"], inv_ts=inv_ts, inv_tt=inv_tt,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_L=cfg["BLOCK_L"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    lse_s = torch.empty(VB, **f32)
    ssum = torch.empty((plan["n_sf"], 2), **f32)
    cfg = _STUDENT_FINISH_CFG
    _student_finish_kernel[(plan["n_sf"],)](
        part_ptr=part_s, lse_s_ptr=lse_s, ssum_ptr=ssum, B=B, n_rows=VB, n_tv=n_tv, n_chunks=plan["nch_s"],
        BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    loss = torch.empty((), **f32)
    stats = torch.empty(len(STAT_NAMES), **f32)
    cfg = _LOSS_CFG
    _loss_kernel[(1,)](tsum_ptr=tsum, ssum_ptr=ssum, loss_ptr=loss, stats_ptr=stats, n_t=plan["n_tf"],
                       n_s=plan["n_sf"], n_trows=rows_t, n_srows=VB, n_pairs=_n_pairs(ncrops, n_tv), B=B,
                       BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return loss, stats, colsum, lse_t, lse_s


def _triton_grad(student, teacher, center, lse_t, lse_s, grad_output, ncrops, n_tv, teacher_temp, student_temp):
    """Kernel 5: grad_output * d loss / d student, in the student's dtype."""
    VB, K = student.shape
    B = VB // ncrops
    plan = _plan(B, K, ncrops, n_tv, _num_sms(student.device))
    grad = torch.empty_like(student)          # (ncrops*B, K)
    coef = 1.0 / (_n_pairs(ncrops, n_tv) * B * student_temp)
    cfg = plan["cfg_s"]
    _student_grad_kernel[plan["grid_s"]](
        s_ptr=student, t_ptr=teacher, c_ptr=center, lse_t_ptr=lse_t, lse_s_ptr=lse_s, grad_ptr=grad,
        go_ptr=grad_output, coef=coef, B=B, K=K, ncrops=ncrops, n_tv=n_tv, chunk=plan["chunk_s"],
        inv_ts=1.0 / student_temp, inv_tt=1.0 / teacher_temp, BLOCK_T=cfg["BLOCK_T"], BLOCK_L=cfg["BLOCK_L"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return grad


# --------------------------------------------------------------------------- torch impl (same algebra)
def _row_stats(x: torch.Tensor):
    """Per row of x: lse, entropy of softmax(x), 1/l (= max prob), e = e^(x-M), l."""
    M = x.amax(-1, keepdim=True)
    xs = x - M
    e = xs.exp()
    l = e.sum(-1)
    log_l = l.log()
    return M[..., 0] + log_l, log_l - (e * xs).sum(-1) / l, 1.0 / l, e, l


def _torch_teacher(teacher, center, n_tv, teacher_temp):
    lse_t, ent_t, maxp_t, e, l = _row_stats((teacher.float() - center) / teacher_temp)   # e: (T*B, K)
    return lse_t, ent_t, maxp_t, (e / l[:, None]).view(n_tv, -1, e.shape[-1])           # q: (T, B, K)


def _torch_forward(student, teacher, center, ncrops, n_tv, teacher_temp, student_temp):
    VB, K = student.shape
    B = VB // ncrops
    n_pairs = _n_pairs(ncrops, n_tv)
    lse_t, ent_t, maxp_t, q = _torch_teacher(teacher, center, n_tv, teacher_temp)
    x = (student.float() / student_temp).view(ncrops, B, K)
    lse_s, ent_s, _, _, _ = _row_stats(x)                                             # (ncrops, B)
    n_same = min(n_tv, ncrops)
    # sum_v <Q_v, x_v> - m_v lse_v  with Q_v = sum_i q_i - q_v (v < T)
    cross = (x * q.sum(0)).sum(-1).sum() - (x[:n_same] * q[:n_same]).sum(-1).sum()
    lse_term = n_tv * lse_s.sum() - lse_s[:n_same].sum()
    loss = (lse_term - cross) / (n_pairs * B)
    ent_t = ent_t.view(n_tv, B)
    ent_w = ncrops * ent_t.sum() - ent_t[:n_same].sum()
    stats = torch.stack([ent_t.mean(), ent_s.mean(), loss - ent_w / (n_pairs * B), maxp_t.mean(),
                         center.norm()])
    colsum = teacher.float().sum(0, keepdim=True)
    return loss, stats, colsum, lse_t, lse_s.reshape(-1)


def _torch_grad(student, teacher, center, lse_t, lse_s, grad_output, ncrops, n_tv, teacher_temp, student_temp):
    VB, K = student.shape
    B = VB // ncrops
    q = ((teacher.float() - center) / teacher_temp - lse_t[:, None]).exp().view(n_tv, B, K)
    p = (student.float() / student_temp - lse_s[:, None]).exp().view(ncrops, B, K)
    n_same = min(n_tv, ncrops)
    g = n_tv * p - q.sum(0)                                       # (ncrops, B, K)
    g[:n_same] += -p[:n_same] + q[:n_same]                        # m_v = T-1, Q_v excludes q_v
    scale = grad_output.float() / (_n_pairs(ncrops, n_tv) * B * student_temp)
    return (g * scale).view(VB, K).to(student.dtype)


# --------------------------------------------------------------------------- autograd
class _DINOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, ncrops, n_tv, teacher_temp, student_temp, impl, need_grad,
                grad_in_forward):
        fwd, grad_fn = (_triton_forward, _triton_grad) if impl == "triton" else (_torch_forward, _torch_grad)
        args = (ncrops, n_tv, teacher_temp, student_temp)
        loss, stats, colsum, lse_t, lse_s = fwd(student, teacher, center, *args)
        ctx.mark_non_differentiable(stats, colsum)
        ctx.set_materialize_grads(False)
        ctx.grad_impl, ctx.args, ctx.grad_in_forward = grad_fn, args, grad_in_forward
        if need_grad and grad_in_forward:
            one = torch.ones((), dtype=torch.float32, device=student.device)
            ctx.save_for_backward(grad_fn(student, teacher, center, lse_t, lse_s, one, *args))
        elif need_grad:
            ctx.save_for_backward(student, teacher, center, lse_t, lse_s)
        return loss, stats, colsum

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_colsum):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 10
        if ctx.grad_in_forward:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss                # fp32 0-dim: computed in fp32, stored in grad's dtype
        else:
            grad = ctx.grad_impl(*ctx.saved_tensors, grad_loss.float().contiguous(), *ctx.args)
        return (grad,) + (None,) * 9


def resolve_impl(impl: str, tensor: torch.Tensor, ncrops: int, n_tv: int) -> str:
    """The implementation `impl` ("auto", "triton", "torch") runs for logits like `tensor`:
    auto is Triton on CUDA tensors when the view counts fit its tiles, else torch."""
    if impl not in IMPLS:
        raise ValueError(f"dino_loss: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if tensor.is_cuda and _triton_supports(ncrops, n_tv) else "torch"
    if impl == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("dino_loss: impl='triton' needs CUDA tensors (got a CPU tensor); use impl='torch' "
                           "or 'auto', or set TRITON_INTERPRET=1 before importing triton")
    return impl


def _check(student, teacher, center, ncrops, n_tv):
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"dino_loss: student_output and teacher_output must be 2-D (rows, out_dim), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if ncrops < 1 or n_tv < 1 or _n_pairs(ncrops, n_tv) < 1:
        raise ValueError(f"dino_loss: need ncrops >= 2 (or >= 1 with >= 2 teacher views), got ncrops={ncrops}, "
                         f"n_teacher_views={n_tv}")
    K = student.shape[1]
    if student.shape[0] == 0 or student.shape[0] % ncrops:
        raise ValueError(f"dino_loss: student_output has {student.shape[0]} rows, not a positive multiple of "
                         f"ncrops={ncrops}; pass the logits of all crops concatenated crop-major")
    B = student.shape[0] // ncrops
    if teacher.shape != (n_tv * B, K):
        raise ValueError(f"dino_loss: teacher_output must be ({n_tv}*B, out_dim) = {(n_tv * B, K)} for "
                         f"student_output {tuple(student.shape)} and ncrops={ncrops}, got {tuple(teacher.shape)}")
    if center.numel() != K:
        raise ValueError(f"dino_loss: center must have out_dim={K} elements, got {tuple(center.shape)}")
    for name, x in (("student_output", student), ("teacher_output", teacher)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"dino_loss: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    if teacher.device != student.device or center.device != student.device:
        raise ValueError(f"dino_loss: student_output ({student.device}), teacher_output ({teacher.device}) and "
                         f"center ({center.device}) must be on the same device")


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor, ncrops: int,
              teacher_temp: float, student_temp: float = 0.1, n_teacher_views: int = 2, impl: str = "auto",
              grad_in_forward: bool = False, return_stats: bool = False):
    """Functional DINO loss.

    student_logits: (ncrops*B, K), crop-major; teacher_logits: (n_teacher_views*B, K)
    (no gradient); center: (1, K). Returns (loss, teacher_column_sum) -- the fp32
    scalar loss (differentiable w.r.t. student_logits) and the fp32 (1, K) sum of
    the teacher logits over its rows, for the center update
    `c <- m c + (1-m) all_reduce(sum) / (rows * world_size)`. With
    return_stats=True a third item: dict of 0-dim health statistics (keys STAT_NAMES).
    """
    _check(student_logits, teacher_logits, center, ncrops, n_teacher_views)
    impl = resolve_impl(impl, student_logits, ncrops, n_teacher_views)
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    loss, stats, colsum = _DINOLossFunction.apply(
        student_logits.contiguous(), teacher_logits.detach().contiguous(),
        center.detach().float().contiguous().view(-1), ncrops, n_teacher_views, float(teacher_temp),
        float(student_temp), impl, need_grad, grad_in_forward)
    if return_stats:
        return loss, colsum, dict(zip(STAT_NAMES, stats.unbind(0)))
    return loss, colsum


# --------------------------------------------------------------------------- compile specs
def compile_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, configuration) the launcher can pick, for AOT
    compilation; problem = programs launched at B=64, K=65536, ncrops=12, T=2."""
    B, K, V, T = 64, 65536, 12, 2
    plan = _plan(B, K, V, T, _H100_SMS)
    prob = dict(B=B, K=K, ncrops=V, n_teacher_views=T)
    specs = []
    for name in _DTYPES.values():
        ptr = f"*{name}"
        cfg = _TEACHER_CFG
        specs.append(KernelSpec(
            "dino_loss_teacher_stats", _teacher_stats_kernel,
            dict(t_ptr=ptr, c_ptr="*fp32", part_ptr="*fp32", colpart_ptr="*fp32", n_rows="i32", K="i32",
                 chunk="i32", n_chunks="i32", inv_tt="fp32", BLOCK_R="constexpr", BLOCK_K="constexpr"),
            dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"], cfg["num_stages"], name,
            dict(prob, grid=math.prod(plan["grid_t"]))))
        for block_t in _STUDENT_BLOCK_T:
            for block_l in _STUDENT_BLOCK_L:
                cfg = _student_config(block_t, block_l)
                ce = dict(BLOCK_T=block_t, BLOCK_L=block_l, BLOCK_K=cfg["BLOCK_K"])
                _, nch = _chunking(K, B, cfg["BLOCK_K"], _H100_SMS)
                p = dict(prob, grid=B * nch)
                common = dict(s_ptr=ptr, t_ptr=ptr, c_ptr="*fp32", lse_t_ptr="*fp32")
                tail = dict(BLOCK_T="constexpr", BLOCK_L="constexpr", BLOCK_K="constexpr")
                specs.append(KernelSpec(
                    "dino_loss_student_fwd", _student_fwd_kernel,
                    dict(common, part_ptr="*fp32", B="i32", K="i32", ncrops="i32", n_tv="i32", chunk="i32",
                         n_chunks="i32", inv_ts="fp32", inv_tt="fp32", **tail),
                    ce, cfg["num_warps"], cfg["num_stages"], name, p))
                specs.append(KernelSpec(
                    "dino_loss_student_grad", _student_grad_kernel,
                    dict(common, lse_s_ptr="*fp32", grad_ptr=ptr, go_ptr="*fp32", coef="fp32", B="i32", K="i32",
                         ncrops="i32", n_tv="i32", chunk="i32", inv_ts="fp32", inv_tt="fp32", **tail),
                    ce, cfg["num_warps"], cfg["num_stages"], name, p))
    # dtype-independent (fp32 partials only): one spec each
    cfg = _TEACHER_FINISH_CFG
    specs.append(KernelSpec(
        "dino_loss_teacher_finish", _teacher_finish_kernel,
        dict(part_ptr="*fp32", colpart_ptr="*fp32", c_ptr="*fp32", lse_ptr="*fp32", tsum_ptr="*fp32",
             colsum_ptr="*fp32", B="i32", ncrops="i32", n_rows="i32", n_chunks="i32", n_groups="i32", K="i32",
             BLOCK_RF="constexpr", BLOCK_CH="constexpr", BLOCK_C="constexpr"),
        dict(BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"], BLOCK_C=cfg["BLOCK_C"]),
        cfg["num_warps"], cfg["num_stages"], "fp32", dict(prob, grid=plan["n_tf"])))
    cfg = _STUDENT_FINISH_CFG
    specs.append(KernelSpec(
        "dino_loss_student_finish", _student_finish_kernel,
        dict(part_ptr="*fp32", lse_s_ptr="*fp32", ssum_ptr="*fp32", B="i32", n_rows="i32", n_tv="i32",
             n_chunks="i32", BLOCK_RF="constexpr", BLOCK_CH="constexpr"),
        dict(BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"]),
        cfg["num_warps"], cfg["num_stages"], "fp32", dict(prob, grid=plan["n_sf"])))
    cfg = _LOSS_CFG
    specs.append(KernelSpec(
        "dino_loss_finish", _loss_kernel,
        dict(tsum_ptr="*fp32", ssum_ptr="*fp32", loss_ptr="*fp32", stats_ptr="*fp32", n_t="i32", n_s="i32",
             n_trows="i32", n_srows="i32", n_pairs="i32", B="i32", BLOCK="constexpr"),
        dict(BLOCK=cfg["BLOCK"]), cfg["num_warps"], cfg["num_stages"], "fp32", dict(prob, grid=1)))
    # The JIT specialises integers divisible by 16: at K = 65536 (and any K, chunk
    # that are multiples of 16) the launch compiles an aligned variant of each
    # K-sweeping kernel. Declare it too, so its registers/spills are proven.
    sweeping = ("dino_loss_teacher_stats", "dino_loss_student_fwd", "dino_loss_student_grad")
    specs += [dataclasses.replace(s, divisible_by_16=("K", "chunk")) for s in specs if s.name in sweeping]
    return specs


__all__ = ["dino_loss", "resolve_impl", "compile_specs", "STAT_NAMES", "IMPLS"]
