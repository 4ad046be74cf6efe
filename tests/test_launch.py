"""Launch environment detection (plain / torchrun / SLURM), SLURM nodelists, named
collectives with timeouts, and the collective watchdog."""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.runtime import launch
from dino_fast.runtime.launch import (CollectiveError, CollectiveWatchdog, LaunchError, detect_launch,
                                    expand_nodelist, init_distributed, named_collective, slurm_master_port)

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- nodelists
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node1,node2", ["node1", "node2"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("x-[001-002],y[5]", ["x-001", "x-002", "y5"]),
    ("localhost", ["localhost"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu[a-b]", "gpu[5-3]", ""])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(LaunchError, match="nodelist"):
        expand_nodelist(bad)


# ----------------------------------------------------------------------------- detection
def test_plain_environment():
    got = detect_launch({"HOME": "/root", "PATH": "/usr/bin"})
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("plain", 0, 1, 0)


def test_torchrun_multi_node_environment():
    env = dict(RANK="13", WORLD_SIZE="16", LOCAL_RANK="5", MASTER_ADDR="node0", MASTER_PORT="29500",
               LOCAL_WORLD_SIZE="8")
    got = detect_launch(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("torchrun", 13, 16, 5)
    assert (got.master_addr, got.master_port) == ("node0", 29500)


def test_torchrun_wins_over_slurm_inside_an_allocation():
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234",
               SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_JOB_ID="7")
    assert detect_launch(env).launcher == "torchrun"
    assert detect_launch(env).rank == 1


def _slurm_env(**extra):
    env = dict(SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu[03-04,07-08]", SLURM_NODELIST="gpu[03-04,07-08]")
    env.update(extra)
    return env


def test_slurm_variables_map_to_rank_and_world_size():
    got = detect_launch(_slurm_env())
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("slurm", 9, 16, 1)
    assert got.master_addr == "gpu03"
    # 12000 + 4242 % 20000, the same on every task of the job
    assert got.master_port == 12000 + 4242 == slurm_master_port("4242")
    assert 1024 < slurm_master_port(987654321) < 32768


def test_slurm_step_values_and_user_overrides():
    env = _slurm_env(SLURM_PROCID="3", SLURM_STEP_NUM_TASKS="8", SLURM_STEP_NODELIST="gpu[07-08]",
                     MASTER_PORT="30001")
    got = detect_launch(env)
    assert got.world_size == 8 and got.master_addr == "gpu07" and got.master_port == 30001
    got = detect_launch(_slurm_env(MASTER_ADDR="10.0.0.5"))
    assert got.master_addr == "10.0.0.5"


def test_single_task_slurm_job_runs_plain():
    got = detect_launch(dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="5",
                             SLURM_JOB_NODELIST="gpu01"))
    assert (got.launcher, got.world_size) == ("plain", 1)


def test_bad_variables_are_named():
    with pytest.raises(LaunchError, match="SLURM_NTASKS='many'"):
        detect_launch(_slurm_env(SLURM_NTASKS="many"))
    with pytest.raises(LaunchError, match="torchrun"):
        detect_launch(dict(RANK="0", WORLD_SIZE="2"))
    with pytest.raises(LaunchError, match="outside world size"):
        detect_launch(dict(RANK="4", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1"))


def test_init_distributed_plain_process(monkeypatch):
    for var in _LAUNCH_VARS + ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed(timeout_minutes=1)
    try:
        assert (info.rank, info.world_size, info.local_rank, info.is_distributed) == (0, 1, 0, False)
        assert info.backend is None and info.is_main
        assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        assert not dist.is_initialized()
    finally:
        launch.cleanup()
    with pytest.raises(LaunchError, match="dist_timeout"):
        init_distributed(timeout_minutes=0)
    with pytest.raises(LaunchError, match="'mpi'"):
        init_distributed(backend="mpi")


def test_init_distributed_adopts_an_existing_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        info = init_distributed(timeout_minutes=5)
        assert (info.rank, info.world_size, info.backend, info.launcher) == (0, 1, "gloo", "existing")
        assert info.is_distributed and info.device == torch.device("cpu")
    finally:
        launch.cleanup()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- named collectives
def test_named_collective_wraps_errors_without_a_process_group():
    def broken():
        raise RuntimeError("[gloo] Timed out waiting 3000ms for recv operation to complete")

    with pytest.raises(CollectiveError) as err:
        named_collective("all_reduce center", broken)
    msg = str(err.value)
    assert "'all_reduce center' timed out" in msg and "rank 0/1" in msg and "--dist_timeout" in msg
    assert err.value.operation == "all_reduce center" and err.value.rank == 0
    assert named_collective("noop", lambda x: x + 1, 41) == 42


class _FakeEvent:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done


def test_watchdog_logs_once_per_stalled_collective(caplog):
    now = [100.0]
    wd = CollectiveWatchdog(rank=3, world_size=8, warn_after_s=60, timeout_s=1800, clock=lambda: now[0])
    token = wd.begin("barrier after checkpoint")
    now[0] = 150.0
    assert wd.check() == []
    now[0] = 165.0
    with caplog.at_level("WARNING"):
        lines = wd.check()
    assert len(lines) == 1
    assert "rank 3/8" in lines[0] and "'barrier after checkpoint'" in lines[0] and "65 s" in lines[0]
    assert "30 min" in lines[0] and lines[0] in caplog.text
    assert wd.check(now=500.0) == []            # once per op, not every poll
    wd.end(token)
    # an async (NCCL-style) op stays tracked until its event completes
    event = _FakeEvent()
    token = wd.begin("all_reduce center")
    wd.end(token, event)
    assert len(wd.check(now=now[0] + 61)) == 1
    event.done = True
    assert wd.check(now=now[0] + 1000) == [] and not wd._pending


# ----------------------------------------------------------------------------- 2 processes via SLURM vars
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_worker(rank: int, port: int, out_dir: str) -> None:
    for var in _LAUNCH_VARS:
        os.environ.pop(var, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                      SLURM_JOB_ID="99", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    result: dict = {}
    info = init_distributed(timeout_minutes=2, backend="gloo")
    try:
        result.update(rank=info.rank, world=info.world_size, launcher=info.launcher,
                      backend=info.backend, distributed=info.is_distributed,
                      env_rank=os.environ["RANK"], master=os.environ["MASTER_ADDR"])
        t = torch.tensor([float(rank + 1)])
        named_collective("all_reduce test", dist.all_reduce, t)
        result["sum"] = t.item()
        # A short-timeout group: rank 1 never joins the collective, rank 0 must get a named error.
        short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3))
        if rank == 0:
            try:
                named_collective("all_reduce center", dist.all_reduce, torch.ones(4), group=short)
                result["error"] = None
            except CollectiveError as exc:
                result["error"] = str(exc)
                result["operation"] = exc.operation
        else:
            time.sleep(6)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        launch.cleanup()


def test_two_process_slurm_launch_and_named_timeout(tmp_path):
    mp.spawn(_slurm_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for r, res in ((0, r0), (1, r1)):
        assert res["rank"] == r and res["world"] == 2 and res["launcher"] == "slurm"
        assert res["backend"] == "gloo" and res["distributed"] and res["env_rank"] == str(r)
        assert res["master"] == "localhost" and res["sum"] == 3.0
    assert r0["operation"] == "all_reduce center"
    assert "rank 0/2" in r0["error"] and "timed out" in r0["error"] and "'all_reduce center'" in r0["error"]
