"""Start `dino-fast train` the same way on one CPU/GPU, under torchrun, or inside SLURM.

Which launcher started us is read from the environment, in this order:

- torchrun (single or multi node): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- SLURM (`srun dino-fast train ...` inside an allocation, no wrapper script):
  SLURM_PROCID -> rank, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) -> world size,
  SLURM_LOCALID -> local rank; MASTER_ADDR = first host of SLURM_STEP_NODELIST /
  SLURM_JOB_NODELIST (compressed lists such as "gpu[01-04,07]" are expanded here),
  MASTER_PORT = 12000 + SLURM_JOB_ID % 20000 unless already set.
- Anything else, or a world size of 1: a plain single process, no process group.

`init_distributed` picks NCCL when CUDA is present (device cuda:LOCAL_RANK) and
gloo on CPU, and passes `timeout_minutes` (the run's `dist_timeout`) as the process
group timeout, so a collective that waits on a dead or stuck peer raises instead
of hanging. `named_collective("all_reduce center", fn, ...)` re-raises any failure
of a collective as a `CollectiveError` naming the operation, the rank and the
usual causes; while a named collective is in flight for longer than a warning
threshold a background watchdog logs one line saying which operation on which
rank is waiting (for NCCL the op is tracked with a CUDA event polled from the
watchdog thread, so the training step itself never synchronises).

The process-wide state (the process group, the watchdog) mirrors torch.distributed's
own global process group; `cleanup()` tears both down.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

SLURM_PORT_BASE = 12000   # below Linux's ephemeral range (32768-60999)
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. `backend` is None for a plain process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    is_distributed: bool
    launcher: str = "plain"          # "plain" | "torchrun" | "slurm" | "existing" (group made by the caller)
    timeout_minutes: float = 30.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about the launch (pure data, no side effects)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


class LaunchError(RuntimeError):
    """The launch environment is inconsistent; the message names the variable and the fix."""


class CollectiveError(RuntimeError):
    """A named collective failed or timed out; `.operation` and `.rank` say which."""

    def __init__(self, message: str, operation: str, rank: int):
        super().__init__(message)
        self.operation = operation
        self.rank = rank


# ----------------------------------------------------------------------------- environment
def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer; "
                          f"unset it or launch with torchrun/srun, which set it correctly") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: "gpu[01-04,07],login1" -> gpu01 gpu02 gpu03 gpu04 gpu07 login1.

    Zero padding is kept ("[08-10]" -> 08 09 10) and several bracket groups in one name
    expand as a product ("r[1-2]-n[1-2]" -> r1-n1 r1-n2 r2-n1 r2-n2), as `scontrol show
    hostnames` does.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_host(item, nodelist))
    if not hosts:
        raise LaunchError(f"SLURM nodelist {nodelist!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_host(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise LaunchError(f"cannot parse SLURM nodelist {whole!r} (unbalanced brackets in {item!r})")
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    out = []
    for rng in match.group(1).split(","):
        bounds = rng.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            lo, hi, width = int(bounds[0]), int(bounds[1]), len(bounds[0])
            if hi < lo:
                raise LaunchError(f"cannot parse SLURM nodelist {whole!r}: range {rng!r} is reversed")
            values = [str(v).zfill(width) for v in range(lo, hi + 1)]
        else:
            raise LaunchError(f"cannot parse SLURM nodelist {whole!r}: bad range {rng!r}")
        for v in values:
            out.extend(_expand_host(head + v + tail, whole))
    return out


def _first_slurm_host(nodelist: str) -> str:
    try:
        return expand_nodelist(nodelist)[0]
    except LaunchError:
        if shutil.which("scontrol") is None:
            raise
        res = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, timeout=60)
        hosts = res.stdout.split()
        if res.returncode != 0 or not hosts:
            raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {res.stderr.strip()}") from None
        return hosts[0]


def slurm_master_port(job_id: str | int) -> int:
    """Deterministic rendezvous port for a SLURM job: every task computes the same one."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and rendezvous address from the environment.

    torchrun's variables win over SLURM's (torchrun inside an allocation is torchrun).
    A world size of 1 from either launcher is reported as "plain".
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        launcher = "torchrun" if world > 1 else "plain"
        if world > 1 and ("MASTER_ADDR" not in env or port is None):
            raise LaunchError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: "
                              "start with `torchrun --nproc-per-node N ...`, which sets all of them")
        info = LaunchEnv(launcher, rank, world, local, env.get("MASTER_ADDR"), port)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, world_var)
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world <= 1:
            return LaunchEnv("plain", 0, 1, 0, None, None)
        addr = env.get("MASTER_ADDR")
        if addr is None:
            nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                             if k in env), None)
            if nodelist is None:
                raise LaunchError("SLURM launch with several tasks but no SLURM_JOB_NODELIST to find the "
                                  "master host: set MASTER_ADDR to the first node's hostname")
            addr = _first_slurm_host(nodelist)
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = slurm_master_port(_int_env(env, "SLURM_JOB_ID"))
        else:
            raise LaunchError("SLURM launch without SLURM_JOB_ID: set MASTER_PORT to a free port")
        info = LaunchEnv("slurm", rank, world, local, addr, port)
    else:
        return LaunchEnv("plain", 0, 1, 0, None, None)
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"rank {info.rank} is outside world size {info.world_size} "
                          f"({info.launcher} environment): check the launcher's task count")
    return info


def _device_for(local_rank: int, backend: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:          # SLURM --gpus-per-task=1 / gpu-bind: each task sees only its own GPU
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise LaunchError(f"LOCAL_RANK={local_rank} but this node shows only {count} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                          f"start at most {count} processes per node (--nproc-per-node / --ntasks-per-node)")
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------- init / cleanup
_WATCHDOG: CollectiveWatchdog | None = None
_INFO: DistInfo | None = None


def init_distributed(timeout_minutes: float = 30, backend: str | None = None,
                     watchdog_warn_s: float | None = None) -> DistInfo:
    """Initialise the process group (if launched with several processes) and pick the device.

    Args:
        timeout_minutes: `dist_timeout`; a collective not finished after this long raises
            (gloo: RuntimeError in the call; NCCL: the watchdog aborts the process with a
            message) instead of hanging forever.
        backend: "nccl" / "gloo" to override; default NCCL when CUDA is available, else gloo.
        watchdog_warn_s: log a line when a `named_collective` is still in flight after this
            many seconds (default: a fifth of the timeout, at least 30 s).
    Returns a DistInfo; on a plain process: rank 0 of 1, cuda:0 (or cpu), no process group.
    """
    global _WATCHDOG, _INFO
    if timeout_minutes <= 0:
        raise LaunchError(f"dist_timeout must be positive minutes, got {timeout_minutes}")
    if dist.is_available() and dist.is_initialized():   # set up by the caller (tests, notebooks): adopt it
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))
        _INFO = DistInfo(rank, world, local, device, backend, True, "existing", timeout_minutes)
        log.info("launch: using the existing process group (rank %d/%d, %s)", rank, world, backend)
        return _INFO
    launch = detect_launch()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise LaunchError(f"unknown distributed backend {backend!r}: use 'nccl' (GPUs) or 'gloo' (CPU)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' needs CUDA GPUs but none is visible: use backend 'gloo' "
                          "to train on CPU, or check CUDA_VISIBLE_DEVICES / the driver")

    if launch.world_size == 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() and backend == "nccl" \
            else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _INFO = DistInfo(0, 1, 0, device, None, False, launch.launcher, timeout_minutes)
        log.info("launch: plain single process on %s", device)
        return _INFO

    device = _device_for(launch.local_rank, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # env:// reads these; SLURM tasks get them from us, and later code (pipelines) sees one truth.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=str(launch.master_addr),
                      MASTER_PORT=str(launch.master_port))
    log.info("launch: %s rank %d/%d (local %d) on %s, backend %s, rendezvous %s:%s, dist_timeout %g min",
             launch.launcher, launch.rank, launch.world_size, launch.local_rank, device, backend,
             launch.master_addr, launch.master_port, timeout_minutes)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    timeout = datetime.timedelta(minutes=timeout_minutes)
    t0 = time.monotonic()
    try:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout, **kwargs)
    except RuntimeError as exc:
        raise CollectiveError(
            f"rank {launch.rank}/{launch.world_size}: joining the process group at "
            f"{launch.master_addr}:{launch.master_port} failed after {time.monotonic() - t0:.0f} s "
            f"({type(exc).__name__}: {_first_line(exc)}). Check that all {launch.world_size} processes "
            f"were started (srun inside sbatch, or torchrun on every node with the same --rdzv-endpoint), "
            f"that MASTER_ADDR is reachable from every node and MASTER_PORT is free.",
            "init_process_group", launch.rank) from exc
    _INFO = DistInfo(launch.rank, launch.world_size, launch.local_rank, device, backend, True,
                     launch.launcher, timeout_minutes)
    warn_s = watchdog_warn_s if watchdog_warn_s is not None else max(30.0, timeout_minutes * 60 / 5)
    _WATCHDOG = CollectiveWatchdog(launch.rank, launch.world_size, warn_after_s=warn_s,
                                   timeout_s=timeout_minutes * 60)
    _WATCHDOG.start()
    return _INFO


def cleanup() -> None:
    """Stop the watchdog and destroy the process group (safe to call when none exists)."""
    global _WATCHDOG, _INFO
    if _WATCHDOG is not None:
        _WATCHDOG.stop()
        _WATCHDOG = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


# ----------------------------------------------------------------------------- named collectives
class CollectiveWatchdog:
    """Logs one line per named collective that is still in flight after `warn_after_s`.

    Blocking collectives (gloo, barriers) are in flight between `begin` and `end`.
    Asynchronous NCCL work is tracked by a CUDA event recorded after the launch and
    polled with `event.query()` from the watchdog thread (no sync on the training thread).
    `check()` does one poll and returns the lines it logged (the thread calls it every
    `poll_s`; tests call it directly).
    """

    def __init__(self, rank: int, world_size: int, warn_after_s: float, timeout_s: float,
                 poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic, max_pending: int = 256):
        self.rank, self.world_size = rank, world_size
        self.warn_after_s, self.timeout_s, self.poll_s = warn_after_s, timeout_s, poll_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, list] = {}   # token -> [name, t0, event or None, blocking, warned]
        self._next = 0
        self._max_pending = max_pending
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, name: str) -> int:
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._pending[token] = [name, self._clock(), None, True, False]
            return token

    def end(self, token: int, event: Any = None) -> None:
        """The call returned; with `event` the work is still tracked until the event completes."""
        with self._lock:
            entry = self._pending.get(token)
            if entry is None:
                return
            if event is None:
                del self._pending[token]
                return
            entry[2], entry[3] = event, False
            if len(self._pending) > self._max_pending:   # keep the oldest (most telling) entries
                self._pending.pop(max(self._pending))

    def check(self, now: float | None = None) -> list[str]:
        now = self._clock() if now is None else now
        lines = []
        with self._lock:
            for token, entry in list(self._pending.items()):
                name, t0, event, blocking, warned = entry
                if not blocking and event is not None and event.query():
                    del self._pending[token]
                    continue
                waited = now - t0
                if waited >= self.warn_after_s and not warned:
                    entry[4] = True
                    lines.append(
                        f"watchdog: rank {self.rank}/{self.world_size} has waited {waited:.0f} s on collective "
                        f"'{name}' (dist_timeout {self.timeout_s / 60:g} min); another rank is probably "
                        f"stuck, crashed, or running different code (look for the first error in the "
                        f"other ranks' logs)")
        for line in lines:
            log.warning(line)
        return lines

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dino-fast-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 1)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # a watchdog must never kill training
                log.debug("watchdog poll failed: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_timeout(exc: BaseException) -> bool:
    return bool(re.search(r"time(d)?[ _-]?out", str(exc), re.IGNORECASE))


def collective_error(name: str, exc: BaseException, waited: float | None, rank: int, world: int,
                     timeout_min: float | None) -> CollectiveError:
    """The CollectiveError for collective `name` that raised `exc` after `waited` seconds (None:
    not known)."""
    what = "timed out" if _is_timeout(exc) else "failed"
    after = f" after {waited:.1f} s" if waited is not None else ""
    limit = f" (dist_timeout {timeout_min:g} min)" if timeout_min is not None else ""
    return CollectiveError(
        f"rank {rank}/{world}: collective '{name}' {what}{after}{limit}. "
        f"Usual causes: another rank crashed (its log shows the first error), is stuck loading "
        f"data or writing a checkpoint, or ranks ran different code (e.g. a different number of "
        f"batches per epoch). If a long wait is expected (first-step compilation, slow storage), "
        f"raise --dist_timeout. Original error: {type(exc).__name__}: {_first_line(exc)}",
        name, rank)


def collective_context() -> tuple[int, int, float | None]:
    """(rank, world size, dist_timeout in minutes or None) for a collective's error message."""
    info = _INFO
    if info:
        return info.rank, info.world_size, info.timeout_minutes
    initialized = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if initialized else 0), (dist.get_world_size() if initialized else 1), None


def named_collective(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` (a collective or barrier) under the name `name`.

    Any RuntimeError from it (timeout, peer gone) is re-raised as a CollectiveError that
    names the operation and this rank. Under NCCL an async collective returns before it
    runs: the watchdog then follows it through a CUDA event and logs if it stalls; torch's
    NCCL watchdog aborts the job after dist_timeout with the op type in its message.
    """
    wd = _WATCHDOG
    rank, world, timeout_min = collective_context()
    token = wd.begin(name) if wd is not None else None
    t0 = time.monotonic()
    event = None
    try:
        result = fn(*args, **kwargs)
        if wd is not None and _INFO is not None and _INFO.backend == "nccl":
            event = torch.cuda.Event()
            event.record()
        return result
    except RuntimeError as exc:
        raise collective_error(name, exc, time.monotonic() - t0, rank, world, timeout_min) from exc
    finally:
        if wd is not None and token is not None:
            wd.end(token, event)
