"""Multi-head self-attention over packed multi-crop tokens, per backend.

Math: for every row (one crop of one image) with L tokens,
    out = softmax(q k^T * scale) v,   q, k, v: (heads, L, hd)
and no token attends to a token of another row. Packed input is the (T, 3D)
qkv matrix of all rows (layout.PackedLayout); output is (T, D).

Backends (chosen once at model build by `resolve_backend`, logged):
- "xformers": one `memory_efficient_attention` over the whole (1, T) sequence
  with `fmha.BlockDiagonalMask.from_seqlens` (one launch for all crops; CUDA).
- "sdpa":  per resolution group, `F.scaled_dot_product_attention` on the
  (R_g, heads, L_g, hd) strided views of the packed qkv. Rows of one group
  have equal length, so the block-diagonal mask is just the batch dimension:
  exact, no mask, flash/cuDNN/efficient kernels; one launch per group (2).
- "flash": `torch.nn.attention.varlen.varlen_attn` with cu_seqlens (one
  launch; CUDA, bf16/fp16).
- "flex":  `flex_attention` with a document-id BlockMask (one launch; compiled
  on CUDA, eager elsewhere: eager flex materializes the (T, T) scores, tests only).
- "math":  explicit softmax(q k^T) v per group, as the reference; the only
  backend that can return the attention probabilities.
Memory traffic per block is the qkv read + output write (+ the (R, heads, L, L)
probabilities for "math"); FLOPs 4 * L^2 * D per row.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from dino_fast.model.layout import PackedLayout

log = logging.getLogger(__name__)

BACKENDS = ("xformers", "flash", "flex", "sdpa", "math")
_CUDA_ONLY = ("xformers", "flash")


def has_xformers() -> bool:
    return importlib.util.find_spec("xformers") is not None


def has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str = "auto", device: torch.device | str | None = None) -> str:
    """The backend `name` resolves to, checked for availability.

    auto: xformers where it is installed and CUDA is present (one launch for all
    crops, Hopper FA3 kernels), else "sdpa" (per-group flash/cuDNN attention:
    exact, and as fast as a varlen kernel since each group is a dense batch;
    flex is slower than FA2/cuDNN at head dim 64 and needs compilation)."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"attention={name!r}: choose one of auto, {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if name == "auto":
        return "xformers" if (cuda and has_xformers()) else "sdpa"
    if name == "xformers" and not has_xformers():
        raise ValueError("attention='xformers' but xformers is not installed: "
                         "`pip install xformers` (CUDA) or use attention='sdpa'")
    if name == "flash" and not has_varlen():
        raise ValueError(f"attention='flash' needs torch.nn.attention.varlen (torch >= 2.9), "
                         f"this is torch {torch.__version__}: use attention='sdpa'")
    return name


# ---------------------------------------------------------------- per-group views
def _group_qkv(qkv: torch.Tensor, start: int, end: int, rows: int, tokens: int, heads: int):
    """(T, 3D) packed qkv -> q, k, v of one group as (R_g, heads, L_g, hd) views."""
    hd = qkv.shape[-1] // (3 * heads)
    g = qkv[start:end].view(rows, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, R_g, H, L_g, hd)
    return g[0], g[1], g[2]


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(R_g, heads, L_g, hd) -> (R_g * L_g, D)."""
    r, h, n, hd = o.shape
    return o.transpose(1, 2).reshape(r * n, h * hd)


def math_attention(q, k, v, scale: float, dropout_p: float = 0.0, training: bool = False):
    """The reference: explicit probabilities. q, k, v: (R, heads, L, hd).
    Returns (out (R, heads, L, hd), probabilities (R, heads, L, L))."""
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, dropout_p, training)
    return attn @ v, attn


def _per_group(qkv, layout: PackedLayout, heads: int, scale: float, dropout_p: float, fn):
    outs = []
    for _, s, e, r, n in layout.groups():
        q, k, v = _group_qkv(qkv, s, e, r, n, heads)
        outs.append(_merge_heads(fn(q, k, v)))
    return outs[0] if len(outs) == 1 else torch.cat(outs)  # (T, D)


# ---------------------------------------------------------------- cached masks
@functools.lru_cache(maxsize=16)
def _xformers_mask(layout: PackedLayout, device: torch.device):
    from xformers.ops import fmha
    try:  # newer xformers build the sequence starts on the device once, here
        return fmha.BlockDiagonalMask.from_seqlens(layout.seqlens, device=device)
    except TypeError:
        return fmha.BlockDiagonalMask.from_seqlens(layout.seqlens)


@functools.lru_cache(maxsize=16)
def _cu_seqlens(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    cu = [0]
    for n in layout.seqlens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(layout: PackedLayout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask
    doc = torch.cat([torch.arange(layout.row_offsets[g], layout.row_offsets[g + 1], device=device)
                     .repeat_interleave(n) for g, _, _, _, n in layout.groups()])  # (T,) row id per token

    def same_row(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    # compiled on CUDA: the eager path evaluates the mask on all T x T pairs in memory
    return create_block_mask(same_row, None, None, layout.total_tokens, layout.total_tokens, device=device,
                             _compile=device.type == "cuda")


_COMPILED_FLEX = []


def _flex(q, k, v, block_mask, scale):
    """flex_attention, compiled on CUDA (eager flex materializes the scores).
    Inside an outer torch.compile the plain op is traced and compiled there."""
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0](q, k, v, block_mask=block_mask, scale=scale)


NEEDS_AUX = ("xformers", "flash", "flex")


@torch.compiler.disable
def attention_aux(layout: PackedLayout, backend: str, device: torch.device):
    """The mask object a one-launch backend needs for `layout` (cached per layout
    and device). Called once per forward, outside the blocks, and kept out of
    torch.compile graphs (one graph break per forward instead of one per block)."""
    if backend in _CUDA_ONLY and device.type != "cuda":
        return None
    if backend == "xformers":
        return _xformers_mask(layout, device) if layout.num_groups > 1 else None
    if backend == "flash":
        return _cu_seqlens(layout, device)
    if backend == "flex":
        return _flex_block_mask(layout, device)
    return None


# ---------------------------------------------------------------- dispatch
def packed_attention(qkv: torch.Tensor, layout: PackedLayout, heads: int, scale: float,
                     backend: str, dropout_p: float = 0.0, training: bool = False, aux=None) -> torch.Tensor:
    """Block-diagonal self-attention of packed qkv (T, 3D) -> (T, D).
    aux: `attention_aux(layout, backend, device)`, computed here when None."""
    T, three_d = qkv.shape
    D = three_d // 3
    hd = D // heads
    p = dropout_p if training else 0.0
    if backend in _CUDA_ONLY and qkv.device.type != "cuda":
        backend = _cpu_fallback(backend)
    if backend == "math":
        return _per_group(qkv, layout, heads, scale, p,
                          lambda q, k, v: math_attention(q, k, v, scale, p, training)[0])
    if backend == "sdpa":
        return _per_group(qkv, layout, heads, scale, p,
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale))
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention
        if layout.num_groups == 1:  # one resolution: a dense batch, no mask needed
            q, k, v = qkv.view(layout.rows[0], layout.tokens[0], 3, heads, hd).unbind(2)
            bias = None
        else:
            q, k, v = qkv.view(1, T, 3, heads, hd).unbind(2)  # (1, T, H, hd) each
            bias = aux if aux is not None else _xformers_mask(layout, qkv.device)
        return memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scale).reshape(T, D)
    if backend == "flash":
        from torch.nn.attention.varlen import varlen_attn
        if p:
            raise ValueError("attention='flash' (varlen_attn) has no attention dropout: use 'sdpa'")
        q, k, v = qkv.view(T, 3, heads, hd).unbind(1)  # (T, H, hd) each
        cu = aux if aux is not None else _cu_seqlens(layout, qkv.device)
        n = layout.max_tokens
        if _varlen_has_scale():
            out = varlen_attn(q, k, v, cu, cu, n, n, scale=scale)
        else:  # torch 2.9/2.10: fixed 1/sqrt(hd) scale, fold ours into q
            out = varlen_attn(q * (scale * hd ** 0.5) if scale != hd ** -0.5 else q, k, v, cu, cu, n, n)
        return out.reshape(T, D)
    if backend == "flex":
        if p:
            raise ValueError("attention='flex' has no attention dropout: use 'sdpa'")
        q, k, v = qkv.view(T, 3, heads, hd).permute(1, 2, 0, 3).unsqueeze(1).unbind(0)  # (1, H, T, hd)
        mask = aux if aux is not None else _flex_block_mask(layout, qkv.device)
        out = _flex(q, k, v, mask, scale)  # (1, H, T, hd)
        return out[0].transpose(0, 1).reshape(T, D)
    raise ValueError(f"unknown attention backend {backend!r}")


@functools.lru_cache(maxsize=None)
def _varlen_has_scale() -> bool:
    import inspect
    from torch.nn.attention.varlen import varlen_attn
    return "scale" in inspect.signature(varlen_attn).parameters


@functools.lru_cache(maxsize=None)
def _cpu_fallback(backend: str) -> str:
    log.warning("attention=%r needs CUDA tensors; running on CPU with 'sdpa' instead", backend)
    return "sdpa"
