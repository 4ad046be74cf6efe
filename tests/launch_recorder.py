"""Test helper: record every kernel launch a launcher makes, and check each
against the declared compile specs (`compile_specs()` of the kernel module).

`record_launches(module)` swaps each `@triton.jit` kernel that is a global of
`module` for a recorder while active; `undeclared_launches(launches, specs)`
names every launch no spec covers (kernel, constexprs, warps, stages, pointer
element types), so a launcher that drifts from its declared table fails
tests/test_kernels_aot.py. Each `Launch` also keeps how many arguments were
passed positionally (launchers pass them all by keyword).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                    "bool": "i1"}
_LAUNCH_DEFAULTS = {"num_warps": 4, "num_stages": 3}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def _base_function(fn):
    """The plain Python function under a @triton.jit / interpreter / autotune object."""
    seen = 0
    while hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    return fn


@dataclass
class Launch:
    """One kernel launch as a launcher issued it (recorded by `record_launches`)."""
    kernel: str
    fn: object
    args: dict
    options: dict
    n_positional: int = 0            # arguments passed by position (0 for a keyword launch)

    def describe(self) -> str:
        shown = {k: (f"<tensor {v.dtype}>" if hasattr(v, "dtype") and hasattr(v, "data_ptr") else v)
                 for k, v in self.args.items()}
        return f"{self.kernel}({shown}, {self.options})"


class _Recorder:
    """Stands in for a kernel object: records `kernel[grid](...)` calls, then launches."""

    def __init__(self, kernel, log: list):
        self._kernel, self._log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self._kernel.arg_names)
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
            self._log.append(Launch(_base_function(self._kernel).__name__,
                                    _base_function(self._kernel), bound, options, len(args)))
            return self._kernel[grid](*args, **kwargs)
        return launch

    def __call__(self, *args, **kwargs):      # a @triton.jit helper called from a kernel
        return self._kernel(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kernel, name)


class record_launches:
    """Context manager: while active, every `@triton.jit` kernel that is a global
    of `module` is replaced by a recorder; `.launches` lists what ran."""

    def __init__(self, module):
        self.module = module
        self.launches: list[Launch] = []
        self._saved: dict[str, object] = {}

    def __enter__(self):
        from triton.runtime.jit import KernelInterface
        kernels = {n: o for n, o in vars(self.module).items() if isinstance(o, KernelInterface)}
        sources = {}
        for n, o in kernels.items():
            try:
                sources[n] = inspect.getsource(_base_function(o))
            except (OSError, TypeError):
                sources[n] = ""
        for name, obj in kernels.items():
            # a @triton.jit helper called from another kernel stays as it is: the GPU compiler
            # resolves it by name and must find the real function
            called = re.compile(rf"\b{re.escape(name)}\s*\(")
            if not any(called.search(src) for other, src in sources.items() if other != name):
                self._saved[name] = obj
        for name, obj in self._saved.items():
            setattr(self.module, name, _Recorder(obj, self.launches))
        return self

    def __exit__(self, *exc):
        for name, obj in self._saved.items():
            setattr(self.module, name, obj)
        return False


def _launch_matches(launch: Launch, spec) -> bool:
    if _base_function(spec.fn) is not launch.fn:
        return False
    for key, default in _LAUNCH_DEFAULTS.items():
        if launch.options.get(key, default) != getattr(spec, key):
            return False
    for name, value in spec.constexprs.items():
        if name not in launch.args or launch.args[name] != value:
            return False
    for name, ty in spec.signature.items():
        value = launch.args.get(name)
        if ty.startswith("*") and hasattr(value, "dtype"):
            if _TORCH_TO_TRITON.get(str(value.dtype).replace("torch.", "")) != ty[1:]:
                return False
    return True


def undeclared_launches(launches: list[Launch], specs) -> list[str]:
    """One line per recorded launch that no declared spec covers (same kernel,
    constexprs, num_warps, num_stages and pointer element types)."""
    specs = list(specs)
    out, seen = [], set()
    for launch in launches:
        if any(_launch_matches(launch, s) for s in specs):
            continue
        text = launch.describe()
        if text not in seen:
            seen.add(text)
            out.append(f"launch not among compile_specs(): {text}")
    return out
