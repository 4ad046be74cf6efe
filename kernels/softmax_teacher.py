"""Teacher probabilities as a softmax of shifted logits, kept implicit.

Math
----
Both teacher centrings of DINOv2 / DINOv3 give, for teacher row r (a sample)
and prototype k, with x = t / tau (t the teacher logits, tau the temperature):

    q[r, k] = exp(x[r, k] + shift[k] - lse[r]),   lse[r] = log sum_k exp(x[r, k] + shift[k])

- softmax centring: shift = -c / tau (c the EMA centre), i.e. softmax((t - c) / tau);
- Sinkhorn-Knopp: shift = v, the per-prototype log-scaling of the last prototype
  normalisation (kernels/sinkhorn_knopp.py).

So a teacher is its logits (N, K), a shift (K,) and an lse (N,): `SoftmaxTeacher`.
The fused cross-entropy (kernels/softmax_ce.py) recomputes q from these on the
fly, so the (N, K) probability matrix is never written; `materialize()` writes
it for callers that want the probabilities themselves (DINOv2's API).

Kernels and memory traffic (N rows, K prototypes, e bytes per logit)
--------------------------------------------------------------------
1. `_sample_lse_kernel`, grid (row groups of BLOCK_R, K chunks): online over K
   per row, the running max, sum-exp and shifted entropy sum of x + shift
   (`_online_update` of kernels/dino_loss.py): reads the logits once, N*K*e.
2. `_sample_lse_finish_kernel`: merges the chunk partials of each row (fixed
   order, no atomics) into lse, the entropy H(q[r]) and max_k q[r] (= 1/l). Tiny.
3. `_softmax_q_kernel`, grid (row blocks, column blocks): q in fp32, one read of
   the logits and one write, N*K*(e + 4).
All accumulation is fp32; row offsets are int64.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from dino_fast.kernels.dino_loss import (_MAX_CHUNKS, _PROGRAMS_PER_SM, _cdiv, _chunking, _combine_chunks, _num_sms,
                                         _online_update)
from dino_fast.kernels.spec import KernelSpec

IMPLS = ("auto", "triton", "torch")
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------- kernels
@triton.jit
def _sample_lse_kernel(t_ptr, shift_ptr, part_ptr, N, K, chunk, n_chunks, inv_temp,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(0)                       # row group
    j = tl.program_id(1)                       # column chunk
    rows = g * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    row_off = rows.to(tl.int64) * K            # int64: rows*K may pass 2^31
    m = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    a = tl.zeros([BLOCK_R], tl.float32)
    k_start = j * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        mask = row_ok[:, None] & col_ok[None, :]
        t = tl.load(t_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)                 # fp32, L2-resident
        m, l, a = _online_update(m, l, a, t * inv_temp + sh[None, :], mask)
    off = rows * n_chunks + j
    stride = N * n_chunks
    tl.store(part_ptr + off, m, mask=row_ok)
    tl.store(part_ptr + stride + off, l, mask=row_ok)
    tl.store(part_ptr + 2 * stride + off, a, mask=row_ok)


@triton.jit
def _sample_lse_finish_kernel(part_ptr, lse_ptr, ent_ptr, maxp_ptr, N, n_chunks,
                              BLOCK_RF: tl.constexpr, BLOCK_CH: tl.constexpr):
    p = tl.program_id(0)
    rows = p * BLOCK_RF + tl.arange(0, BLOCK_RF)
    ok = rows < N
    M, l, a = _combine_chunks(part_ptr, rows, N, n_chunks, BLOCK_RF, BLOCK_CH)
    log_l = tl.log(l)
    tl.store(lse_ptr + rows, M + log_l, mask=ok)
    tl.store(ent_ptr + rows, log_l - a / l, mask=ok)
    tl.store(maxp_ptr + rows, 1.0 / l, mask=ok)


@triton.jit
def _softmax_q_kernel(t_ptr, shift_ptr, lse_ptr, q_ptr, N, K, inv_temp,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    tl.store(q_ptr + offs, tl.exp(tl.where(mask, t * inv_temp + sh[None, :] - lse[:, None], 0.0)), mask=mask)


# --------------------------------------------------------------------------- launch helpers
# One source of truth for every configuration the launchers can pick; the
# launchers and compile_specs() both read these.
LSE_CFG = dict(BLOCK_R=16, BLOCK_K=128, num_warps=8, num_stages=2)
LSE_FINISH_CFG = dict(BLOCK_RF=64, BLOCK_CH=64, num_warps=4, num_stages=1)
Q_CFG = dict(BLOCK_R=16, BLOCK_K=256, num_warps=8, num_stages=1)
H100_SMS = 132                  # for the compile specs' problem description
# K is split into chunks as the DINO loss does it (one planner for every online-over-K kernel):
# at most MAX_CHUNKS partials per row, which the finish kernels merge in one BLOCK_CH tile.
MAX_CHUNKS, PROGRAMS_PER_SM = _MAX_CHUNKS, _PROGRAMS_PER_SM
cdiv, chunking, num_sms = _cdiv, _chunking, _num_sms
assert LSE_FINISH_CFG["BLOCK_CH"] >= MAX_CHUNKS


def resolve_impl(impl: str, tensor: torch.Tensor, op: str) -> str:
    """"auto" -> "triton" on CUDA tensors, else "torch"; "triton" on a CPU tensor
    only under TRITON_INTERPRET=1."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if impl == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{op}: impl='triton' needs CUDA tensors (got a CPU tensor); use impl='torch' "
                           "or 'auto', or set TRITON_INTERPRET=1 before importing triton")
    return impl


def check_logits(x: torch.Tensor, name: str, op: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (rows, prototypes), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


# --------------------------------------------------------------------------- the teacher
@dataclasses.dataclass(frozen=True)
class SoftmaxTeacher:
    """Teacher probabilities q[r, k] = exp(logits[r, k] * inv_temp + shift[k] - lse[r]),
    kept as the logits and two log-scalings instead of an (N, K) matrix.

    Produced by `softmax_teacher` (softmax centring) and
    `dino_fast.kernels.sinkhorn_knopp.sinkhorn_knopp(..., materialize=False)`;
    consumed by `dino_fast.kernels.softmax_ce.softmax_ce`, which recomputes q
    where it needs it. All tensors live on the logits' device; nothing here
    synchronises the host.
    """
    logits: torch.Tensor               # (N, K) teacher logits (fp32 / bf16 / fp16), contiguous, no grad
    shift: torch.Tensor                # (K,) fp32 per-prototype log-scaling
    lse: torch.Tensor                  # (N,) fp32 per-row log normaliser
    inv_temp: float                    # 1 / teacher temperature
    entropy: torch.Tensor | None = None    # (N,) fp32 H(q[r]) (nats), where computed
    max_prob: torch.Tensor | None = None   # (N,) fp32 max_k q[r, k], where computed

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    def __len__(self) -> int:
        return self.logits.shape[0]

    def rows(self, start: int, stop: int) -> "SoftmaxTeacher":
        """The teacher of rows [start, stop) (views, no copy)."""
        cut = (lambda x: None if x is None else x[start:stop])
        return dataclasses.replace(self, logits=self.logits[start:stop], lse=self.lse[start:stop],
                                   entropy=cut(self.entropy), max_prob=cut(self.max_prob))

    def materialize(self, impl: str = "auto") -> torch.Tensor:
        """q as an fp32 (N, K) tensor (one read of the logits, one write)."""
        impl = resolve_impl(impl, self.logits, "SoftmaxTeacher.materialize")
        if impl == "torch" or self.logits.numel() == 0:
            return (self.logits.float() * self.inv_temp + self.shift - self.lse[:, None]).exp()
        N, K = self.logits.shape
        q = torch.empty((N, K), dtype=torch.float32, device=self.logits.device)
        cfg = Q_CFG
        _softmax_q_kernel[(cdiv(N, cfg["BLOCK_R"]), cdiv(K, cfg["BLOCK_K"]))](
            t_ptr=self.logits, shift_ptr=self.shift, lse_ptr=self.lse, q_ptr=q, N=N, K=K,
            inv_temp=self.inv_temp, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return q

    def stats(self) -> dict[str, torch.Tensor]:
        """Mean entropy and max probability over the rows (0-dim device tensors)."""
        out = {}
        if self.entropy is not None:
            out["teacher_entropy"] = self.entropy.mean()
        if self.max_prob is not None:
            out["teacher_max_prob"] = self.max_prob.mean()
        return out


# --------------------------------------------------------------------------- per-row lse
def _lse_plan(N: int, K: int, n_sm: int) -> dict:
    groups = cdiv(N, LSE_CFG["BLOCK_R"])
    chunk, n_chunks = chunking(K, groups, LSE_CFG["BLOCK_K"], n_sm)
    return dict(groups=groups, chunk=chunk, n_chunks=n_chunks)


def _sample_lse_triton(logits, shift, inv_temp):
    N, K = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    plan = _lse_plan(N, K, num_sms(logits.device))
    part = torch.empty((3, N, plan["n_chunks"]), **f32)
    cfg = LSE_CFG
    _sample_lse_kernel[(plan["groups"], plan["n_chunks"])](
        t_ptr=logits, shift_ptr=shift, part_ptr=part, N=N, K=K, chunk=plan["chunk"], n_chunks=plan["n_chunks"],
        inv_temp=inv_temp, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    lse, ent, maxp = (torch.empty(N, **f32) for _ in range(3))
    cfg = LSE_FINISH_CFG
    _sample_lse_finish_kernel[(cdiv(N, cfg["BLOCK_RF"]),)](
        part_ptr=part, lse_ptr=lse, ent_ptr=ent, maxp_ptr=maxp, N=N, n_chunks=plan["n_chunks"],
        BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return lse, ent, maxp


def _sample_lse_torch(logits, shift, inv_temp):
    x = logits.float() * inv_temp + shift                   # (N, K)
    M = x.amax(-1, keepdim=True)
    xs = x - M
    e = xs.exp()
    l = e.sum(-1)
    log_l = l.log()
    return M[:, 0] + log_l, log_l - (e * xs).sum(-1) / l, 1.0 / l


def sample_lse(logits: torch.Tensor, shift: torch.Tensor, inv_temp: float, impl: str = "auto"):
    """Per row r of logits (N, K): lse[r] = log sum_k exp(logits[r, k] * inv_temp + shift[k]),
    the entropy of that softmax and its max probability -- three fp32 (N,) tensors."""
    impl = resolve_impl(impl, logits, "sample_lse")
    if logits.shape[0] == 0:
        empty = logits.new_empty(0, dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    fn = _sample_lse_triton if impl == "triton" else _sample_lse_torch
    return fn(logits, shift, float(inv_temp))


def softmax_teacher(teacher_logits: torch.Tensor, teacher_temp: float, center: torch.Tensor | None = None,
                    impl: str = "auto") -> SoftmaxTeacher:
    """Softmax centring, implicit: the teacher softmax((t - center) / teacher_temp)
    of teacher_logits (N, K) and an fp32 center with K elements (None: no
    centring), as a `SoftmaxTeacher` (one read of the logits)."""
    check_logits(teacher_logits, "teacher_logits", "softmax_teacher")
    logits = teacher_logits.detach().contiguous()
    inv = 1.0 / float(teacher_temp)
    K = logits.shape[1]
    if center is None:
        shift = torch.zeros(K, dtype=torch.float32, device=logits.device)
    else:
        if center.numel() != K:
            raise ValueError(f"softmax_teacher: center must have {K} elements (the logits' prototypes), "
                             f"got shape {tuple(center.shape)}")
        shift = center.detach().float().reshape(K) * -inv
    lse, ent, maxp = sample_lse(logits, shift, inv, impl)
    return SoftmaxTeacher(logits, shift, lse, inv, ent, maxp)


# --------------------------------------------------------------------------- compile specs
def compile_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, configuration) the launchers can pick; problem =
    programs launched for the iBOT teacher of DINOv3 (N = 4915 masked tokens,
    K = 98304) on an H100."""
    N, K = 4915, 98304
    plan = _lse_plan(N, K, H100_SMS)
    prob = dict(N=N, K=K)
    specs = []
    for name in DTYPES.values():
        cfg = LSE_CFG
        specs.append(KernelSpec(
            "softmax_teacher_lse", _sample_lse_kernel,
            dict(t_ptr=f"*{name}", shift_ptr="*fp32", part_ptr="*fp32", N="i32", K="i32", chunk="i32",
                 n_chunks="i32", inv_temp="fp32", BLOCK_R="constexpr", BLOCK_K="constexpr"),
            dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"], cfg["num_stages"], name,
            dict(prob, grid=plan["groups"] * plan["n_chunks"])))
        cfg = Q_CFG
        specs.append(KernelSpec(
            "softmax_teacher_q", _softmax_q_kernel,
            dict(t_ptr=f"*{name}", shift_ptr="*fp32", lse_ptr="*fp32", q_ptr="*fp32", N="i32", K="i32",
                 inv_temp="fp32", BLOCK_R="constexpr", BLOCK_K="constexpr"),
            dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"]), cfg["num_warps"], cfg["num_stages"], name,
            dict(prob, grid=cdiv(N, cfg["BLOCK_R"]) * cdiv(K, cfg["BLOCK_K"]))))
    cfg = LSE_FINISH_CFG
    specs.append(KernelSpec(
        "softmax_teacher_lse_finish", _sample_lse_finish_kernel,
        dict(part_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", maxp_ptr="*fp32", N="i32", n_chunks="i32",
             BLOCK_RF="constexpr", BLOCK_CH="constexpr"),
        dict(BLOCK_RF=cfg["BLOCK_RF"], BLOCK_CH=cfg["BLOCK_CH"]), cfg["num_warps"], cfg["num_stages"], "fp32",
        dict(prob, grid=cdiv(N, cfg["BLOCK_RF"]))))
    # K (and chunk, a multiple of BLOCK_K) divisible by 16 -- K = 65536, 98304,
    # 262144 -- compile an aligned variant at launch: declare it too
    specs += [dataclasses.replace(s, divisible_by_16=("K", "chunk") if "chunk" in s.signature else ("K",))
              for s in specs if "K" in s.signature]
    return specs


__all__ = ["SoftmaxTeacher", "softmax_teacher", "sample_lse", "compile_specs"]
