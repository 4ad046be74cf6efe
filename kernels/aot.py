"""Ahead-of-time compile of every Triton kernel for real GPU targets.

The Triton interpreter (CPU, CI) accepts programs the GPU compiler rejects and
says nothing about registers or spills. This module compiles every declared
`KernelSpec` (see `spec.py`) for sm_80 / sm_90 (and sm_100 where the bundled
ptxas supports it) on a machine without a GPU:

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))

then runs the ptxas bundled in the triton wheel (`-v --gpu-name sm_90a`) on
the PTX: registers per thread, spill store/load bytes and static shared memory
come from its report (the source of truth), dynamic shared memory from the
compiled metadata. From those it estimates resident blocks per SM and the
number of waves for the spec's default problem (`spec.problem["grid"]`).

A `@triton.jit` object created under TRITON_INTERPRET=1 is an interpreter
function and cannot be compiled, so compilation always runs in worker
subprocesses whose environment has TRITON_INTERPRET removed.

Every kernel module is listed in `KERNEL_MODULES` (a test checks that each
`kernels/*.py` holding a `@triton.jit` is listed) and defines
`compile_specs() -> list[KernelSpec]`. A "module:function" entry names
another spec function (used by the tests for deliberately broken specs).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import import_module

# Every module of dino_fast.kernels that holds a @triton.jit kernel.
KERNEL_MODULES: tuple[str, ...] = (
    "dino_fast.kernels.dino_loss",
    "dino_fast.kernels.ema",
    "dino_fast.kernels.sinkhorn_knopp",
    "dino_fast.kernels.softmax_ce",
    "dino_fast.kernels.softmax_teacher",
)


@dataclass(frozen=True)
class Arch:
    """A GPU target and the per-SM limits of its flagship data-centre part."""
    name: str               # "sm_90"
    cc: int                 # compute capability as Triton spells it (90)
    ptxas_name: str         # --gpu-name for ptxas ("sm_90a")
    device: str             # the part the occupancy estimate assumes
    sms: int                # streaming multiprocessors
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024        # shared memory per SM, bytes
    smem_per_block: int = 227 * 1024     # max shared memory one block may use
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHS: dict[str, Arch] = {
    "sm_80": Arch("sm_80", 80, "sm_80", "A100 SXM", 108,
                  smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_90": Arch("sm_90", 90, "sm_90a", "H100 SXM", 132),
    "sm_100": Arch("sm_100", 100, "sm_100a", "B200", 148),
}
DEFAULT_ARCHS = ("sm_80", "sm_90", "sm_100?")   # "?" = only where the bundled ptxas supports it
_SMEM_RESERVED_PER_BLOCK = 1024                 # the CUDA runtime keeps 1 KB per block (sm_80+)


@dataclass
class CompileResult:
    """One (kernel, configuration, arch) row of the report."""
    kernel: str
    module: str
    dtype: str
    config: str
    arch: str
    ok: bool = True
    error: str = ""
    num_warps: int = 0
    regs: int = 0                    # registers per thread (ptxas)
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0
    smem_bytes: int = 0              # dynamic (Triton) + static (ptxas) shared memory per block
    blocks_per_sm: int = 0           # estimated resident blocks per SM
    limiter: str = ""                # what bounds blocks_per_sm: regs | smem | warps | blocks
    grid: int | None = None          # programs launched for the default problem
    waves: int | None = None

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def label(self) -> str:
        return f"{self.kernel} [{self.dtype}; {self.config}] on {self.arch}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["spill_bytes"] = self.spill_bytes
        return out


# --------------------------------------------------------------------------- estimates
def occupancy(arch: Arch, regs: int, smem_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them, as the CUDA
    occupancy calculator does: registers are allocated per warp in units of
    256, shared memory in 128-byte units plus 1 KB reserved per block."""
    limits = {"blocks": arch.max_blocks_per_sm,
              "warps": arch.max_warps_per_sm // num_warps}
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits["regs"] = (arch.regs_per_sm // regs_per_warp) // num_warps
    smem = math.ceil(smem_bytes / 128) * 128 + _SMEM_RESERVED_PER_BLOCK
    limits["smem"] = arch.smem_per_sm // smem
    limiter = min(limits, key=lambda k: (limits[k], k != "regs"))
    return limits[limiter], limiter


def waves(grid: int, blocks_per_sm: int, sms: int) -> int | None:
    """ceil(grid / (blocks_per_SM * SMs)); None when no block fits."""
    if blocks_per_sm <= 0:
        return None
    return math.ceil(grid / (blocks_per_sm * sms))


def grid_size(problem: dict) -> int | None:
    grid = problem.get("grid")
    if grid is None:
        return None
    if isinstance(grid, (tuple, list)):
        return math.prod(int(g) for g in grid)
    return int(grid)


_PTXAS_FIELDS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, stack, spills and static shared memory from `ptxas -v`."""
    out = {}
    for key, pattern in _PTXAS_FIELDS.items():
        values = [int(v) for v in pattern.findall(log)]
        out[key] = max(values) if values else 0
    if not _PTXAS_FIELDS["regs"].search(log):
        raise ValueError(f"no register report in the ptxas output:\n{log}")
    return out


# --------------------------------------------------------------------------- compile (worker side)
def ptxas_path(cc: int) -> str:
    """The ptxas triton itself uses for `cc` (ptxas-blackwell for sm_100+ on recent wheels)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(cc)
        return tool[0] if isinstance(tool, tuple) else tool.path     # (path, version) before triton 3.4
    except (ImportError, AttributeError, RuntimeError):
        import triton
        bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        return os.path.join(bin_dir, "ptxas")


def run_ptxas(ptx: str, arch: Arch) -> str:
    """`ptxas -v` on `ptx`; returns its report, raises RuntimeError with it on failure."""
    with tempfile.TemporaryDirectory(prefix="dino_fast_aot_") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(arch.cc), "-v", f"--gpu-name={arch.ptxas_name}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas --gpu-name={arch.ptxas_name} failed:\n{proc.stderr.strip()}")
    return proc.stderr + proc.stdout


def _jit_function(fn):
    """The JITFunction under autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    seen = 0
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{fn!r} is not a @triton.jit function (TRITON_INTERPRET must be unset "
                        "in the compiling process)")
    return fn


def _attrs(fn, signature: dict[str, str], aligned: tuple[str, ...] | None) -> dict:
    """Divisibility-by-16 hints as the JIT launcher gives them: every pointer
    (torch allocations are 256-byte aligned) plus integers named in
    `spec.divisible_by_16` (or `spec.problem["divisible_by_16"]`)."""
    names = list(fn.arg_names)
    attrs = {}
    for arg, ty in signature.items():
        if ty.startswith("*") or arg in (aligned or ()):
            attrs[(names.index(arg),)] = [["tt.divisibility", 16]]
    return attrs


def compile_spec(spec, arch: Arch, module: str = "") -> CompileResult:
    """Compile one spec for one arch and fill its resource report. Never raises:
    a failure comes back as `ok=False` with the compiler's message."""
    res = CompileResult(kernel=spec.name, module=module, dtype=spec.dtype, config=spec.config,
                        arch=arch.name, num_warps=spec.num_warps, grid=grid_size(spec.problem))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        fn = _jit_function(spec.fn)
        missing = [a for a in fn.arg_names if a not in spec.signature]
        if missing:
            raise ValueError(f"signature lacks argument(s) {missing} of {fn.__name__}")
        aligned = tuple(getattr(spec, "divisible_by_16", ()) or spec.problem.get("divisible_by_16", ()))
        bad = [a for a in aligned if spec.signature.get(a, "")[:1] not in ("i", "u")]
        if bad:
            raise ValueError(f"problem['divisible_by_16'] names {bad}, which are not integer arguments")
        src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), _attrs(fn, spec.signature, aligned))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch.cc, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        report = parse_ptxas(run_ptxas(compiled.asm["ptx"], arch))
    except Exception as exc:  # the compiler's own message is the report
        res.ok = False
        res.error = f"{type(exc).__name__}: {exc}".strip()
        return res
    res.regs = report["regs"]
    res.stack_bytes = report["stack_bytes"]
    res.spill_store_bytes = report["spill_store_bytes"]
    res.spill_load_bytes = report["spill_load_bytes"]
    res.smem_bytes = int(getattr(compiled.metadata, "shared", 0) or 0) + report["static_smem"]
    if res.smem_bytes > arch.smem_per_block:
        res.ok = False
        res.error = (f"needs {res.smem_bytes} bytes of shared memory per block; {arch.device} "
                     f"allows {arch.smem_per_block} (the launch would fail: out of resources)")
        return res
    res.blocks_per_sm, res.limiter = occupancy(arch, res.regs, res.smem_bytes, spec.num_warps)
    if res.grid is not None:
        res.waves = waves(res.grid, res.blocks_per_sm, arch.sms)
    return res


# --------------------------------------------------------------------------- spec discovery
def load_specs(entries: tuple[str, ...] | list[str]) -> tuple[list[tuple[str, object]], list[CompileResult]]:
    """(module, spec) pairs from each "module" or "module:function" entry, and
    one failed row per entry that cannot be imported or lacks compile_specs."""
    specs, errors = [], []
    for entry in entries:
        mod_name, _, fn_name = entry.partition(":")
        fn_name = fn_name or "compile_specs"
        try:
            module = import_module(mod_name)
            make = getattr(module, fn_name, None)
            if make is None:
                raise AttributeError(f"{mod_name} defines no {fn_name}() (every kernel module must "
                                     f"declare its compile specs, see dino_fast.kernels.spec)")
            found = list(make())
            if not found:
                raise ValueError(f"{entry}: {fn_name}() returned no specs")
        except Exception as exc:
            errors.append(CompileResult(kernel=f"<{entry}>", module=mod_name, dtype="-", config="-",
                                        arch="-", ok=False, error=f"{type(exc).__name__}: {exc}"))
            continue
        specs += [(mod_name, s) for s in found]
    return specs, errors


_PROBE_PTX_CACHE: dict[int, bool] = {}


def arch_supported(arch: Arch) -> bool:
    """Whether triton + its bundled ptxas can build for `arch` (probe with a tiny kernel)."""
    if arch.cc not in _PROBE_PTX_CACHE:
        import triton
        import triton.language as tl

        @triton.jit
        def _probe(x, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x + offs, tl.load(x + offs) + 1.0)

        from dino_fast.kernels.spec import KernelSpec
        spec = KernelSpec("probe", _probe, {"x": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128})
        _PROBE_PTX_CACHE[arch.cc] = compile_spec(spec, arch).ok
    return _PROBE_PTX_CACHE[arch.cc]


def worker(entries: list[str], arch_names: list[str], shard: int, nshards: int) -> list[dict]:
    """Compile this shard's share of the specs for each arch (runs without TRITON_INTERPRET)."""
    specs, errors = load_specs(entries)
    rows = [e.to_dict() for e in errors] if shard == 0 else []
    archs = []
    for name in arch_names:
        optional = name.endswith("?")
        arch = ARCHS[name.rstrip("?")]
        if optional and not arch_supported(arch):
            if shard == 0:
                rows.append({"skipped_arch": arch.name,
                             "note": f"{arch.name}: the bundled ptxas/triton cannot build for it; skipped"})
            continue
        archs.append(arch)
    jobs = [(m, s, a) for a in archs for m, s in specs]
    for mod, spec, arch in jobs[shard::nshards]:
        rows.append(compile_spec(spec, arch, mod).to_dict())
    return rows


# --------------------------------------------------------------------------- driver (parent side)
def parse_arches(text: str | None) -> list[str]:
    """"sm_80,sm_90" -> names; unknown names raise ValueError naming the choices."""
    if not text:
        return list(DEFAULT_ARCHS)
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a.rstrip("?") not in ARCHS]
    if bad:
        raise ValueError(f"--arch: unknown architecture(s) {bad}; choose from {sorted(ARCHS)}")
    return names


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def compile_all(entries: tuple[str, ...] | list[str] = KERNEL_MODULES, arches: list[str] | None = None,
                jobs: int = 2, timeout_s: float = 1800) -> tuple[list[CompileResult], list[str]]:
    """Compile every spec of `entries` for `arches` in `jobs` worker processes.
    Returns (rows sorted by kernel/dtype/config/arch, notes)."""
    arches = arches or list(DEFAULT_ARCHS)
    jobs = max(1, int(jobs))
    cmd = [sys.executable, "-m", "dino_fast.kernels.aot", "--entries", ",".join(entries),
           "--arch", ",".join(arches), "--nshards", str(jobs)]

    def run_shard(i: int) -> list[dict]:
        proc = subprocess.run(cmd + ["--shard", str(i)], capture_output=True, text=True,
                              env=_clean_env(), timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile worker {i} crashed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(jobs) as pool:
        shards = list(pool.map(run_shard, range(jobs)))
    rows, notes = [], []
    for shard in shards:
        for row in shard:
            if "skipped_arch" in row:
                notes.append(row["note"])
            else:
                row.pop("spill_bytes", None)
                rows.append(CompileResult(**row))
    order = {name.rstrip("?"): i for i, name in enumerate(arches)}
    rows.sort(key=lambda r: (r.ok, r.module, r.kernel, r.dtype, r.config, order.get(r.arch, -1)))
    return rows, notes


def failures(rows: list[CompileResult], max_spill_bytes: int = 0) -> list[str]:
    """One line per row that failed to compile or spills more than the budget."""
    out = []
    for r in rows:
        if not r.ok:
            out.append(f"{r.label}: compile failed: {r.error}")
        elif r.spill_bytes > max_spill_bytes:
            out.append(f"{r.label}: spills {r.spill_store_bytes} B stored + {r.spill_load_bytes} B "
                       f"loaded per thread (budget {max_spill_bytes} B; {r.regs} registers)")
    return out


def _main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="AOT compile worker (used by `dino-fast kernels`)")
    p.add_argument("--entries", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--nshards", type=int, default=1)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("the AOT worker must run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    rows = worker([e for e in a.entries.split(",") if e], a.arch.split(","), a.shard, a.nshards)
    sys.stdout.write("\n" + json.dumps(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
