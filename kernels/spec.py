"""Compile specs: what a launcher may hand to the Triton compiler.

Each kernel module defines `compile_specs() -> list[KernelSpec]`, built from
the same constants its launcher uses to choose block sizes, warps and
stages (one source of truth), one spec per (kernel, dtype, configuration).
`dino-fast kernels` compiles every spec ahead of time with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...))`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class KernelSpec:
    """One compile configuration of one `@triton.jit` kernel.

    name: short name shown in reports, e.g. "dino_loss_fwd".
    fn: the `@triton.jit` function.
    signature: argument name -> Triton type string ("*fp32", "*bf16", "i32",
        "i64", "fp32", or "constexpr" for constexpr arguments).
    constexprs: constexpr argument name -> value.
    num_warps, num_stages: launch options, as the launcher passes them.
    dtype: the input dtype this spec serves ("fp32", "bf16", "fp16").
    problem: optional default problem description used for occupancy/waves
        estimates, e.g. {"grid": 1536} (number of programs launched).
    divisible_by_16: integer arguments the launcher passes as multiples of 16
        (the JIT specialises them at launch, e.g. K = 65536): the compile
        marks them aligned, as the real launch does.
    """

    name: str
    fn: Callable[..., Any]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    dtype: str = "fp32"
    problem: dict[str, Any] = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()

    @property
    def config(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.constexprs.items())]
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        if self.divisible_by_16:
            parts.append("div16=" + "+".join(self.divisible_by_16))
        return ",".join(parts)
