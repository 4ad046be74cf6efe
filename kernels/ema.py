"""Teacher EMA: θt ← λ·θt + (1−λ)·θs over every parameter, in one launch.

Math (per element, fp32):   t ← t·λ + s·(1−λ)
    t: teacher parameter (fp32 or bf16), s: student parameter (fp32 or bf16),
    λ: the momentum, a Python float or a 0-dim device tensor read inside the
    kernel (no host sync when the schedule lives on the device). Like the
    reference (Python float λ): λ and 1−λ are formed in fp64 and rounded to
    fp32 once, so near λ → 1 the weight 1−λ keeps its relative precision (a
    fp32 1−λ would be quantised to multiples of 2⁻²⁴); a fp64 momentum tensor
    gives the float path bit for bit.
    λ = 1 leaves the teacher bit-exact (t·1 + s·0); λ = 0 copies the student.

Memory traffic (the floor): read t, read s, write t. ViT-B/8 + DINO head
(109 M parameters, fp32): 3 × 4 B × 109 M ≈ 1.31 GB ≈ 0.39 ms at 3.35 TB/s.
The reference's per-parameter loop (`t.mul_(m).add_((1-m)*s)`) moves 7 passes
(mul_: r+w t; (1-m)*s: r s + w tmp; add_: r t + r tmp + w t) in ~3 launches
per tensor (≈ 480 launches for 158 tensors).

Design: pointer table, not flat buffers. A flat buffer needs the parameters
allocated as views into one teacher and one student allocation, which FSDP2
(it owns the sharded storage), checkpoint loading and `param.data = ...`
assignments all break; the pointer table works on any list of contiguous
tensors, DTensor local shards included, and moves the same bytes. The kernel
is launched over fixed blocks of BLOCK elements; a per-block int64 table
(nblocks, 3) = (teacher address, student address, valid elements) tells each
program where its block lives: one table row (24 B) per 4096 elements adds
0.05 % to the traffic and avoids a dependent per-tensor lookup (a binary
search or a block->tensor->pointer chain). The table is built once per
(addresses, shapes, dtypes) key and cached, so repeated steps only rebuild
the key on the host. Full blocks take an unmasked path with the addresses
hinted 16-byte aligned (128-bit vector loads; checked on the host when the
table is built, else the unhinted variant runs); the one tail block of each
tensor takes the masked path. The element type comes from two typed
reference pointers (`t_ref`, `s_ref`), so the kernel is specialised per
(teacher dtype, student dtype): tensors are grouped by that pair (plus
alignment) and each group is one launch; a model in one dtype is one group,
hence one launch per step.

Non-contiguous tensors (rare for parameters) cannot be addressed by a base
pointer and a length: they go through the `torch._foreach` path.

Not built: a fused AdamW + EMA step. Per fp32 parameter AdamW moves 28 B
(read p, g, m, v; write p, m, v) and the EMA 12 B; fusing them saves only the
student re-read, 4 B of 40 B: 0.44 GB = 10 % of the optimizer + EMA traffic,
≈ 0.13 ms per step on an H100 for ViT-B/8 + head, against a training step of
≈ 260 ms (64 images per GPU at 50 % MFU): ≤ 0.05 % of the step.
The price would be re-implementing torch.optim.AdamW's semantics (per-group
lr / weight-decay schedules, step counters, params whose grad is None -- the
frozen last layer in epoch 1 still needs its EMA --, DTensor grads) and giving
up torch's own fused AdamW. Not worth it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import triton
import triton.language as tl

from dino_fast.kernels.spec import KernelSpec

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

logger = logging.getLogger(__name__)

# Launch configuration (one source of truth for the launcher and compile_specs):
# 4096 elements per program, 8 warps -> 16 elements per thread and tensor, i.e.
# four 128-bit loads of each of t and s in flight per thread for fp32.
BLOCK = 4096
NUM_WARPS = 8
NUM_STAGES = 1          # no loop to pipeline
ALIGN_BYTES = 16        # 128-bit vector access

_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
IMPLS = ("auto", "triton", "foreach", "loop")


# --------------------------------------------------------------------------- kernel
@triton.jit
def _ema_kernel(table_ptr, t_ref, s_ref, mom_ptr, mom, one_minus_mom,
                BLOCK: tl.constexpr, MOM_FROM_PTR: tl.constexpr, ALIGNED: tl.constexpr):
    # table_ptr: (nblocks, 3) int64 rows (teacher address, student address, n valid)
    # t_ref / s_ref: typed pointers used only for their element type
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + pid * 3
    t_addr = tl.load(row)
    s_addr = tl.load(row + 1)
    n = tl.load(row + 2)
    t_ptr = t_addr.to(t_ref.dtype, bitcast=True)
    s_ptr = s_addr.to(s_ref.dtype, bitcast=True)
    if ALIGNED:
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if MOM_FROM_PTR:
        m64 = tl.load(mom_ptr)                 # fp64, as the reference's Python float
        c = (1.0 - m64).to(tl.float32)
        m = m64.to(tl.float32)
    else:
        m = mom
        c = one_minus_mom
    offs = tl.arange(0, BLOCK)
    if n == BLOCK:  # full block: unmasked, vectorised
        t = tl.load(t_ptr + offs).to(tl.float32)   # fp32 math
        s = tl.load(s_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, (t * m + s * c).to(t_ref.dtype.element_ty))
    else:           # tail block of a tensor
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, (t * m + s * c).to(t_ref.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- inputs
def _as_tensor_list(params, name: str) -> list[torch.Tensor]:
    if isinstance(params, torch.nn.Module):
        return list(params.parameters())
    if isinstance(params, torch.Tensor):
        raise TypeError(f"ema_update_: {name} must be a list of tensors or an nn.Module, "
                        f"got a single tensor of shape {tuple(params.shape)}; wrap it in a list")
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"ema_update_: {name}[{i}] is a {type(p).__name__}, expected a tensor")
    return out


def _is_dtensor(p: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(p, _DTensor)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter), the tensor itself otherwise."""
    if _is_dtensor(p):
        p = p.to_local()
    return p.detach()


def _check_pairs(teacher: list, student: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if len(teacher) != len(student):
        raise ValueError(
            f"ema_update_: teacher_params has {len(teacher)} tensors but student_params has "
            f"{len(student)}; pass the parameters of the same architecture in the same order "
            f"(teacher.parameters(), student.parameters())")
    t_out, s_out = [], []
    for i, (t, s) in enumerate(zip(teacher, student)):
        t_dt, s_dt = _is_dtensor(t), _is_dtensor(s)
        if t_dt != s_dt:
            raise ValueError(
                f"ema_update_: index {i}: teacher is {'a DTensor' if t_dt else 'a plain tensor'} "
                f"but student is {'a DTensor' if s_dt else 'a plain tensor'}; shard teacher and "
                f"student identically (fully_shard both) or neither")
        if t_dt and tuple(t.placements) != tuple(s.placements):
            raise ValueError(f"ema_update_: index {i}: teacher placements {t.placements} differ "
                             f"from student placements {s.placements}; shard both identically")
        tl_, sl = _local(t), _local(s)
        if tl_.shape != sl.shape:
            raise ValueError(f"ema_update_: shape mismatch at index {i}: teacher "
                             f"{tuple(tl_.shape)} vs student {tuple(sl.shape)}")
        if tl_.device != sl.device:
            raise ValueError(f"ema_update_: device mismatch at index {i}: teacher on "
                             f"{tl_.device}, student on {sl.device}; move both to one device")
        if not (tl_.is_floating_point() and sl.is_floating_point()):
            raise TypeError(f"ema_update_: index {i}: teacher {tl_.dtype} / student {sl.dtype}; "
                            f"the EMA needs floating-point tensors")
        t_out.append(tl_)
        s_out.append(sl)
    return t_out, s_out


def _momentum(momentum, device: torch.device):
    """A Python float in [0, 1], or a 0-dim tensor on `device` (no host sync)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1:
            raise ValueError(f"ema_update_: momentum tensor must have one element, got shape "
                             f"{tuple(momentum.shape)}; index the schedule (schedule[it])")
        if momentum.device.type == "cpu" and device.type != "cpu":
            momentum = float(momentum)  # a CPU value costs no device sync
        else:
            if momentum.device != device:
                raise ValueError(f"ema_update_: momentum is on {momentum.device} but the "
                                 f"parameters are on {device}")
            if not momentum.is_floating_point():
                raise TypeError(f"ema_update_: momentum tensor must be floating point, got "
                                f"{momentum.dtype}")
            return momentum.detach().reshape(())
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {momentum}")
    return momentum


# --------------------------------------------------------------------------- reference paths
@torch.no_grad()
def ema_update_reference_(teacher_params, student_params, momentum) -> None:
    """The reference's per-parameter loop (facebookresearch/dino main_dino.py):
    `param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`."""
    teacher, student = _check_pairs(_as_tensor_list(teacher_params, "teacher_params"),
                                    _as_tensor_list(student_params, "student_params"))
    m = momentum
    for param_q, param_k in zip(student, teacher):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def _ema_foreach_(teacher: list[torch.Tensor], student: list[torch.Tensor], m) -> None:
    """`torch._foreach_lerp_` (weight 1−λ) per (dtype, dtype, device) group; a
    tensor momentum uses `_foreach_mul_` + `_foreach_add_` (no host sync); a
    student in another dtype is cast to the teacher's first."""
    groups: dict[tuple, tuple[list, list]] = {}
    for t, s in zip(teacher, student):
        if t.numel() == 0:
            continue
        g = groups.setdefault((t.dtype, s.dtype, t.device), ([], []))
        g[0].append(t)
        g[1].append(s)
    for (t_dtype, s_dtype, _), (ts, ss) in groups.items():
        if s_dtype != t_dtype:
            ss = [s.to(t_dtype) for s in ss]
        if isinstance(m, torch.Tensor):
            torch._foreach_mul_(ts, m)
            torch._foreach_add_(ts, torch._foreach_mul(ss, 1.0 - m))
        else:
            torch._foreach_lerp_(ts, ss, 1.0 - m)


# --------------------------------------------------------------------------- triton launcher
class _Group:
    __slots__ = ("table", "nblocks", "t_index", "aligned")

    def __init__(self, table: torch.Tensor, nblocks: int, t_index: int, aligned: bool):
        self.table, self.nblocks, self.t_index, self.aligned = table, nblocks, t_index, aligned


_TABLE_CACHE: "OrderedDict[tuple, list[_Group]]" = OrderedDict()
_TABLE_CACHE_SIZE = 16
_DUMMY: dict[torch.device, torch.Tensor] = {}


def _block_table(ts: Sequence[torch.Tensor], ss: Sequence[torch.Tensor]) -> torch.Tensor:
    """(nblocks, 3) int64: teacher address, student address, valid elements of
    every BLOCK-sized block of every tensor, tensors in order."""
    numel = torch.tensor([t.numel() for t in ts], dtype=torch.int64)
    t_ptr = torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)
    s_ptr = torch.tensor([s.data_ptr() for s in ss], dtype=torch.int64)
    nb = (numel + BLOCK - 1) // BLOCK                                  # (T,)
    tid = torch.repeat_interleave(torch.arange(len(ts)), nb)           # (nblocks,)
    first = torch.cumsum(nb, 0) - nb                                   # (T,)
    start = (torch.arange(tid.numel()) - first[tid]) * BLOCK           # (nblocks,) element offset
    table = torch.stack([t_ptr[tid] + start * ts[0].element_size(),
                         s_ptr[tid] + start * ss[0].element_size(),
                         torch.clamp(numel[tid] - start, max=BLOCK)], dim=1)  # (nblocks, 3)
    return table.contiguous()


def _build_groups(ts: list[torch.Tensor], ss: list[torch.Tensor], device: torch.device) -> list[_Group]:
    buckets: dict[tuple, list[int]] = {}
    for i, (t, s) in enumerate(zip(ts, ss)):
        aligned = t.data_ptr() % ALIGN_BYTES == 0 and s.data_ptr() % ALIGN_BYTES == 0
        buckets.setdefault((t.dtype, s.dtype, aligned), []).append(i)
    groups = []
    for (_, _, aligned), idx in buckets.items():
        table = _block_table([ts[i] for i in idx], [ss[i] for i in idx]).to(device)
        groups.append(_Group(table, table.shape[0], idx[0], aligned))
    logger.debug("ema: built %d block table(s) for %d tensors (%s blocks)", len(groups), len(ts),
                 [g.nblocks for g in groups])
    return groups


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _ema_triton_(teacher: list[torch.Tensor], student: list[torch.Tensor], m, impl: str) -> None:
    ts, ss, rest_t, rest_s = [], [], [], []
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.numel() == 0:
            continue
        if t.dtype not in _TL_DTYPES or s.dtype not in _TL_DTYPES:
            if impl == "triton":
                raise TypeError(f"ema_update_(impl='triton'): index {i}: teacher {t.dtype} / "
                                f"student {s.dtype}; the kernel takes float32 and bfloat16, "
                                f"use impl='foreach' for other dtypes")
            rest_t.append(t), rest_s.append(s)
        elif t.is_contiguous() and s.is_contiguous():
            ts.append(t), ss.append(s)
        else:
            rest_t.append(t), rest_s.append(s)
    if rest_t:
        _ema_foreach_(rest_t, rest_s, m)
    if not ts:
        return
    device = ts[0].device
    if not _triton_usable(device):
        raise RuntimeError(f"ema_update_(impl='triton'): parameters are on {device}; the Triton "
                           f"kernel needs CUDA tensors (or TRITON_INTERPRET=1); use impl='auto'")
    key = (device, tuple(t.data_ptr() for t in ts), tuple(s.data_ptr() for s in ss),
           tuple(t.numel() for t in ts), tuple(t.dtype for t in ts), tuple(s.dtype for s in ss))
    groups = _TABLE_CACHE.get(key)
    if groups is None:
        groups = _build_groups(ts, ss, device)
        _TABLE_CACHE[key] = groups
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    if isinstance(m, torch.Tensor):
        mom_ptr, mom, one_minus, from_ptr = m.to(torch.float64), 0.0, 0.0, True
    else:
        dummy = _DUMMY.get(device)
        if dummy is None:
            dummy = _DUMMY[device] = torch.zeros((), dtype=torch.float64, device=device)
        mom_ptr, mom, one_minus, from_ptr = dummy, m, 1.0 - m, False
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for g in groups:  # usually one group: one launch
            _ema_kernel[(g.nblocks,)](table_ptr=g.table, t_ref=ts[g.t_index], s_ref=ss[g.t_index],
                                      mom_ptr=mom_ptr, mom=mom, one_minus_mom=one_minus, BLOCK=BLOCK,
                                      MOM_FROM_PTR=from_ptr, ALIGNED=g.aligned,
                                      num_warps=NUM_WARPS, num_stages=NUM_STAGES)


# --------------------------------------------------------------------------- public API
@torch.no_grad()
def ema_update_(teacher_params, student_params, momentum, impl: str = "auto") -> None:
    """In place θt ← λ·θt + (1−λ)·θs for every (teacher, student) pair.

    teacher_params, student_params: lists (or iterables) of tensors in the same
        order, or nn.Modules (their .parameters()); FSDP2 DTensor parameters are
        updated on their local shards (no all-gather).
    momentum: λ as a Python float or a one-element tensor (a 0-dim device tensor
        is read inside the kernel: no host sync).
    impl: "auto" (Triton on CUDA, foreach on CPU), "triton" (one launch per
        (teacher dtype, student dtype) group), "foreach" (torch._foreach_lerp_),
        "loop" (the reference's per-parameter loop).
    """
    if impl not in IMPLS:
        raise ValueError(f"ema_update_: impl must be one of {IMPLS}, got {impl!r}")
    teacher, student = _check_pairs(_as_tensor_list(teacher_params, "teacher_params"),
                                    _as_tensor_list(student_params, "student_params"))
    if not teacher:
        return
    device = teacher[0].device
    for i, t in enumerate(teacher):
        if t.device != device:
            raise ValueError(f"ema_update_: index {i} is on {t.device} but index 0 is on {device}; "
                             f"keep all parameters on one device")
    m = _momentum(momentum, device)
    if impl == "loop":
        for t, s in zip(teacher, student):
            t.mul_(m).add_((1 - m) * s)
    elif impl == "foreach" or (impl == "auto" and device.type != "cuda"):
        _ema_foreach_(teacher, student, m)
    else:
        _ema_triton_(teacher, student, m, impl)


# --------------------------------------------------------------------------- problem table
def vit_b8_dino_param_shapes(out_dim: int = 65536, depth: int = 12, embed_dim: int = 768,
                             patch_size: int = 8, img_size: int = 224, mlp_ratio: int = 4,
                             hidden_dim: int = 2048, bottleneck_dim: int = 256) -> dict[str, tuple[int, ...]]:
    """Parameter names -> shapes of the reference ViT-B/8 backbone + DINO head
    (student.parameters() order: backbone then head), from the architecture.
    Defaults: 108,946,432 parameters in 158 tensors."""
    D, H = embed_dim, mlp_ratio * embed_dim
    npatch = (img_size // patch_size) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.cls_token": (1, 1, D),
        "backbone.pos_embed": (1, npatch + 1, D),
        "backbone.patch_embed.proj.weight": (D, 3, patch_size, patch_size),
        "backbone.patch_embed.proj.bias": (D,),
    }
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (H, D), b + "mlp.fc1.bias": (H,),
            b + "mlp.fc2.weight": (D, H), b + "mlp.fc2.bias": (D,),
        })
    shapes.update({
        "backbone.norm.weight": (D,), "backbone.norm.bias": (D,),
        "head.mlp.0.weight": (hidden_dim, D), "head.mlp.0.bias": (hidden_dim,),
        "head.mlp.2.weight": (hidden_dim, hidden_dim), "head.mlp.2.bias": (hidden_dim,),
        "head.mlp.4.weight": (bottleneck_dim, hidden_dim), "head.mlp.4.bias": (bottleneck_dim,),
        "head.last_layer.weight_g": (out_dim, 1),
        "head.last_layer.weight_v": (out_dim, bottleneck_dim),
    })
    return shapes


def num_blocks(shapes: Iterable[Sequence[int]]) -> int:
    """Programs the Triton launcher runs for tensors of these shapes (one group)."""
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += -(-n // BLOCK)
    return total


# --------------------------------------------------------------------------- compile specs
def compile_specs() -> list[KernelSpec]:
    """Every (teacher dtype, student dtype, momentum source, alignment)
    variant the launcher can pick, with its launch constants."""
    grid = num_blocks(vit_b8_dino_param_shapes().values())
    specs = []
    for t_dt in _TL_DTYPES.values():
        for s_dt in _TL_DTYPES.values():
            for from_ptr in (False, True):
                for aligned in (True, False):
                    specs.append(KernelSpec(
                        name="ema_update",
                        fn=_ema_kernel,
                        signature={"table_ptr": "*i64", "t_ref": f"*{t_dt}", "s_ref": f"*{s_dt}",
                                   "mom_ptr": "*fp64", "mom": "fp32", "one_minus_mom": "fp32",
                                   "BLOCK": "constexpr", "MOM_FROM_PTR": "constexpr",
                                   "ALIGNED": "constexpr"},
                        constexprs={"BLOCK": BLOCK, "MOM_FROM_PTR": from_ptr, "ALIGNED": aligned},
                        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                        dtype=t_dt if t_dt == s_dt else f"{t_dt}<-{s_dt}",
                        problem={"grid": grid, "model": "vit_b8+dino_head(65536)"},
                    ))
    return specs
