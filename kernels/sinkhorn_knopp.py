"""Sinkhorn-Knopp teacher centring (DINOv2 / DINOv3), in the log domain, fused.

Math
----
DINOv2's `sinkhorn_knopp_teacher` takes teacher logits t (B samples, K
prototypes), forms Q = exp(t / tau)^T (K x B), scales it to sum 1, then
n_iterations times scales every row (prototype) to sum 1/K (row sums
all-reduced over ranks) and every column (sample) to sum 1/B (B the global
sample count), and returns B * Q^T. Every step multiplies Q by a per-prototype
or a per-sample factor, so with x = t / tau the result is

    q[b, k] = exp(x[b, k] + v[k] - lse[b]),   lse[b] = log sum_k exp(x[b, k] + v[k])

where v is the log of the accumulated prototype factors: a `SoftmaxTeacher`
(kernels/softmax_teacher.py) with shift = v. The constants (the first global
sum, 1/K, 1/B and the final *B) scale whole rows or columns of Q uniformly and
cancel in the last column normalisation, so the log domain needs only two
vectors, updated alternately (prototype step, then sample step):

    v[k]   = -log sum_b exp(x[b, k] - lse[b])     (lse = 0 before the first sample step; sum over ALL ranks)
    lse[b] =  log sum_k exp(x[b, k] + v[k])        (local to the sample)

Exact where DINOv2's plain exp is finite, and finite where exp(t / tau)
overflows fp32 (|t| / tau > 88: DINOv3's head has no weight norm). Only B*K
logits are read per pass; Q is never rewritten (DINOv2 rewrites the fp32
K x B matrix 4 times per iteration and reads it 6 times).

Distributed: the per-prototype sum runs over every rank's samples. The first
prototype step needs the global max (all_reduce MAX of the local
log-sum-exp, then all_reduce SUM of exp(local - max)); the later ones need one
all_reduce SUM: with the previous v as the shift, each term
exp(x + v_prev - lse) is a probability of the previous iterate, so the global
sum lies in [1/K, B] -- after any prototype step every prototype's row of the
scaled matrix sums to 1 over the samples and every sample's lse grew by at
most log K -- and neither overflows nor underflows. Four collectives of K fp32
for three iterations, as DINOv2 (one scalar + three K-vectors). No host sync.
n_masked_patches (iBOT) and the global B only enter DINOv2's algorithm as
those cancelling constants, so they are not needed here.

Kernels and memory traffic per iteration (B rows, K, e bytes per logit)
-----------------------------------------------------------------------
1. `_prototype_lse_kernel`, grid (K blocks, row groups): per column, online
   over its rows, the max and sum-exp of x - lse: one read of the logits.
2. `_prototype_lse_finish_kernel`: merges the row-group partials of each
   column (fixed order) into v = -log-sum-exp. Tiny (2 * groups * K fp32).
3. the sample step: `sample_lse` of kernels/softmax_teacher.py (online over K
   per row, + entropy and max prob): one read of the logits.
Three iterations: 6 B K e bytes, then either the fused cross-entropy reads
the logits again (q recomputed, never written) or `materialize()` writes q in
fp32 (B K (e + 4)).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from dino_fast.kernels.softmax_teacher import (DTYPES, H100_SMS, PROGRAMS_PER_SM, SoftmaxTeacher, cdiv,
                                               check_logits, num_sms, resolve_impl, sample_lse)
from dino_fast.kernels.spec import KernelSpec


# --------------------------------------------------------------------------- kernels
@triton.jit
def _online_lse_over_rows(m, l, x, mask):
    """Fold a [BLOCK_R, BLOCK_K] tile x (masked entries ignored) into the
    per-column running max m and sum-exp l = sum e^(x - m)."""
    m_new = tl.maximum(m, tl.max(tl.where(mask, x, float("-inf")), 0))
    e = tl.exp(tl.where(mask, x - m_new[None, :], float("-inf")))
    return m_new, tl.exp(m - m_new) * l + tl.sum(e, 0)    # m starts at -1e30: no inf - inf


@triton.jit
def _prototype_lse_kernel(t_ptr, lse_ptr, part_ptr, N, K, rows_per_group, n_groups, inv_temp,
                          FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    kb = tl.program_id(0)                      # column block
    g = tl.program_id(1)                       # row group
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    m = tl.full([BLOCK_K], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_K], tl.float32)
    r_start = g * rows_per_group
    r_end = tl.minimum(r_start + rows_per_group, N)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < r_end
        mask = row_ok[:, None] & col_ok[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0)
        x = t.to(tl.float32) * inv_temp                          # fp32 accumulate
        if not FIRST:
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            x = x - lse[:, None]
        m, l = _online_lse_over_rows(m, l, x, mask)
    off = g.to(tl.int64) * K + cols
    tl.store(part_ptr + off, m, mask=col_ok)
    tl.store(part_ptr + n_groups.to(tl.int64) * K + off, l, mask=col_ok)


@triton.jit
def _prototype_lse_finish_kernel(part_ptr, v_ptr, K, n_groups, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < K
    M = tl.full([BLOCK_C], -1.0e30, tl.float32)
    L = tl.zeros([BLOCK_C], tl.float32)
    m_ptrs = part_ptr + cols                   # advanced by K per group: 64-bit pointer arithmetic
    l_ptrs = part_ptr + n_groups.to(tl.int64) * K + cols
    for _g in range(0, n_groups):
        mg = tl.load(m_ptrs, mask=ok, other=-1.0e30)
        lg = tl.load(l_ptrs, mask=ok, other=0.0)
        M_new = tl.maximum(M, mg)
        L = L * tl.exp(M - M_new) + lg * tl.exp(mg - M_new)
        M = M_new
        m_ptrs += K
        l_ptrs += K
    tl.store(v_ptr + cols, -(M + tl.log(tl.where(ok, L, 1.0))), mask=ok)


# --------------------------------------------------------------------------- launcher
PROTO_CFG = dict(BLOCK_R=16, BLOCK_K=128, num_warps=8, num_stages=2)
PROTO_FINISH_CFG = dict(BLOCK_C=512, num_warps=4, num_stages=1)
MAX_GROUPS = 64


def _proto_plan(N: int, K: int, n_sm: int) -> dict:
    """Row groups of the prototype step: enough programs to fill the device
    (PROGRAMS_PER_SM per SM) when K alone gives too few column blocks."""
    cfg = PROTO_CFG
    k_blocks = cdiv(K, cfg["BLOCK_K"])
    want = max(1, min(cdiv(PROGRAMS_PER_SM * n_sm, k_blocks), cdiv(N, cfg["BLOCK_R"]), MAX_GROUPS))
    rows_per_group = cdiv(cdiv(N, want), cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    return dict(k_blocks=k_blocks, rows_per_group=rows_per_group, n_groups=cdiv(N, rows_per_group))


def _prototype_step_triton(logits, lse, inv_temp):
    N, K = logits.shape
    plan = _proto_plan(N, K, num_sms(logits.device))
    f32 = dict(dtype=torch.float32, device=logits.device)
    part = torch.empty((2, plan["n_groups"], K), **f32)
    cfg = PROTO_CFG
    first = lse is None
    _prototype_lse_kernel[(plan["k_blocks"], plan["n_groups"])](
        t_ptr=logits, lse_ptr=part if first else lse, part_ptr=part, N=N, K=K,
        rows_per_group=plan["rows_per_group"], n_groups=plan["n_groups"], inv_temp=inv_temp, FIRST=first,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    v = torch.empty(K, **f32)
    cfg = PROTO_FINISH_CFG
    _prototype_lse_finish_kernel[(cdiv(K, cfg["BLOCK_C"]),)](
        part_ptr=part, v_ptr=v, K=K, n_groups=plan["n_groups"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return v


def _prototype_step_torch(logits, lse, inv_temp):
    x = logits.float() * inv_temp                            # (N, K)
    if lse is not None:
        x = x - lse[:, None]
    return -torch.logsumexp(x, dim=0)


def _prototype_step(logits, lse, inv_temp, impl):
    """v = -log sum over this rank's rows of exp(x - lse): (K,) fp32 (+inf with no rows)."""
    if logits.shape[0] == 0:
        return torch.full((logits.shape[1],), float("inf"), dtype=torch.float32, device=logits.device)
    fn = _prototype_step_triton if impl == "triton" else _prototype_step_torch
    return fn(logits, lse, inv_temp)


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _global_v(v_local: torch.Tensor, v_prev: torch.Tensor | None, group) -> torch.Tensor:
    """v over all ranks' samples from each rank's v_local (see the module docstring)."""
    lse_local = -v_local
    if v_prev is None:                         # first step: exact max, then the sum
        top = lse_local.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        s = torch.exp(lse_local - top)
        dist.all_reduce(s, group=group)
        return -(top + s.log())
    s = torch.exp(lse_local + v_prev)          # in [0, rows]; the global sum in [1/K, B]
    dist.all_reduce(s, group=group)
    return v_prev - s.log()


def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                   impl: str = "auto", group=None, materialize: bool = True):
    """Sinkhorn-Knopp teacher probabilities of teacher_logits (B, K), in the log domain.

    Returns the fp32 (B, K) probabilities (rows sum to 1), as DINOv2's
    `sinkhorn_knopp_teacher`, or with materialize=False the `SoftmaxTeacher`
    (logits, v, lse) that kernels/softmax_ce.py consumes without ever writing
    them. With torch.distributed initialised the prototype sums run over every
    rank of `group` (default: the default group). impl: "auto" (Triton on CUDA
    tensors), "triton" or "torch" (the same algebra in PyTorch).
    """
    check_logits(teacher_logits, "teacher_output", "sinkhorn_knopp")
    if int(n_iterations) < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1 (got {n_iterations}); with 0 the columns "
                         "of DINOv2's Q are not normalised")
    impl = resolve_impl(impl, teacher_logits, "sinkhorn_knopp")
    logits = teacher_logits.detach().contiguous()
    inv = 1.0 / float(teacher_temp)
    spread = _distributed(group)
    lse = v = None
    for _ in range(int(n_iterations)):
        v_local = _prototype_step(logits, lse, inv, impl)
        v = _global_v(v_local, v, group) if spread else v_local
        lse, ent, maxp = sample_lse(logits, v, inv, impl)
    teacher = SoftmaxTeacher(logits, v, lse, inv, ent, maxp)
    return teacher.materialize(impl) if materialize else teacher


# --------------------------------------------------------------------------- plain reference
@torch.no_grad()
def sinkhorn_knopp_reference(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                             n_samples: torch.Tensor | int | None = None, group=None) -> torch.Tensor:
    """DINOv2's algorithm written the obvious way (plain exp, the K x B matrix
    rescaled in place): the baseline of the benches. n_samples: the global
    sample count (iBOT passes the masked-patch count); default rows x world size.
    Overflows fp32 where |t| / tau > 88, as DINOv2's does."""
    teacher_output = teacher_output.float()
    spread = _distributed(group)
    world = dist.get_world_size(group) if spread else 1
    Q = torch.exp(teacher_output / teacher_temp).t()          # (K, B)
    B = Q.shape[1] * world if n_samples is None else n_samples
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    if spread:
        dist.all_reduce(sum_Q, group=group)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)      # per prototype
        if spread:
            dist.all_reduce(sum_of_rows, group=group)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)                # per sample
        Q /= B
    Q *= B
    return Q.t()


# --------------------------------------------------------------------------- compile specs
def compile_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, configuration) the launcher can pick; problem =
    the DINOv3 CLS teacher (B = 2 crops x 64, K = 262144) on an H100."""
    N, K = 128, 262144
    plan = _proto_plan(N, K, H100_SMS)
    prob = dict(N=N, K=K)
    specs = []
    cfg = PROTO_CFG
    for name in DTYPES.values():
        for first in (True, False):
            specs.append(KernelSpec(
                "sinkhorn_knopp_prototype_lse", _prototype_lse_kernel,
                dict(t_ptr=f"*{name}", lse_ptr="*fp32", part_ptr="*fp32", N="i32", K="i32",
                     rows_per_group="i32", n_groups="i32", inv_temp="fp32", FIRST="constexpr",
                     BLOCK_R="constexpr", BLOCK_K="constexpr"),
                dict(FIRST=first, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"],
                cfg["num_stages"], name, dict(prob, grid=plan["k_blocks"] * plan["n_groups"])))
    cfg = PROTO_FINISH_CFG
    specs.append(KernelSpec(
        "sinkhorn_knopp_prototype_finish", _prototype_lse_finish_kernel,
        dict(part_ptr="*fp32", v_ptr="*fp32", K="i32", n_groups="i32", BLOCK_C="constexpr"),
        dict(BLOCK_C=cfg["BLOCK_C"]), cfg["num_warps"], cfg["num_stages"], "fp32",
        dict(prob, grid=cdiv(K, cfg["BLOCK_C"]))))
    # K divisible by 16 (65536, 98304, 262144; rows_per_group is a multiple of
    # BLOCK_R = 16 always) compiles an aligned variant at launch: declare it too
    specs += [dataclasses.replace(s, divisible_by_16=("K", "rows_per_group") if "rows_per_group" in s.signature
                                  else ("K",)) for s in specs]
    return specs


__all__ = ["sinkhorn_knopp", "sinkhorn_knopp_reference", "compile_specs"]
