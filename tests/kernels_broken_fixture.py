"""Test kernels for tests/test_kernels_aot.py: one that compiles cleanly on
every target (`good_specs`) and three specs the GPU compiler or the hardware
rejects although the Triton interpreter would run them (`broken_specs`):

* `npow2_copy` with BLOCK=24: tl.arange needs a power-of-two range;
* `tile_dot` with 256x256 tiles over 4 stages: ~512 KB of shared memory per
  block, more than any GPU has (the launch would fail "out of resources");
* `row_softmax_spill` with 4096 fp32 values on one warp: 128 values per
  thread plus temporaries, more than 255 registers -> ptxas spills.
"""
import triton
import triton.language as tl

from dino_fast.kernels.spec import KernelSpec


@triton.jit
def row_scale(x_ptr, y_ptr, n_cols, scale, BLOCK: tl.constexpr):
    # one row per program; fp32 math; masked tail
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def npow2_copy(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def tile_dot(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def row_softmax_spill(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs)
    e = tl.exp(v - tl.max(v, 0))
    tl.store(y_ptr + offs, e / tl.sum(e, 0) + v)


def good_specs() -> list[KernelSpec]:
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n_cols": "i32", "scale": "fp32", "BLOCK": "constexpr"}
    return [KernelSpec("row_scale", row_scale, {**sig, "x_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
                       {"BLOCK": 1024}, num_warps=4, num_stages=1, dtype=dt, problem={"grid": 768})
            for dt in ("fp32", "bf16")]


def broken_specs() -> list[KernelSpec]:
    return [
        KernelSpec("npow2_copy", npow2_copy, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                   {"BLOCK": 24}, num_warps=1, num_stages=1),
        KernelSpec("tile_dot", tile_dot,
                   {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32",
                    "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
                   {"BM": 256, "BN": 256, "BK": 128}, num_warps=8, num_stages=4, dtype="bf16"),
        KernelSpec("row_softmax_spill", row_softmax_spill,
                   {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                   {"BLOCK": 4096}, num_warps=1, num_stages=1),
    ]
