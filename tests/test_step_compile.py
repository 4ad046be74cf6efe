"""--compile blocks|model and --cuda_graph_teacher: the compiled step is the eager step (losses,
gradients, student, teacher and centre after 2 steps, fp32), per-block graphs have no graph break
inside a block (torch._dynamo counters) and are not rebuilt after the first step (two crop sizes
in one packed sequence, a second epoch), with every attention backend the CPU runs; FSDP2 with
per-block compile and selective checkpointing on 2 gloo processes equals one eager process. The equality tests compile with
aot_eager (the CPU inductor build of a whole step takes minutes on this machine); one test builds
a block with inductor."""
from __future__ import annotations

import os

import pytest
import torch

from dino_fast.train.compile import CompileMonitor, compile_blocks
from dino_fast.train.config import ConfigError
from tests._dist import run_distributed
from tests._step_options import CFG, B, batches, compare, full, make_state, run_steps


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode,over", [("blocks", {}), ("model", {}),
                                       ("blocks", dict(activation_checkpointing="selective", drop_path_rate=0.2))])
def test_compiled_step_equals_eager(mode, over):
    """With selective checkpointing and drop path the checkpoint (its policy and the recompute's
    RNG replay) is traced inside each block's graph; same draws as eager."""
    eager, comp = make_state(**over), make_state(compile=mode, **over)
    if mode == "blocks":
        assert all(getattr(b, "_dino_fast_compiled", False) for b in comp.student.backbone.blocks)
    mon = CompileMonitor()
    torch.manual_seed(1)
    le = run_steps(eager, batches())
    torch.manual_seed(1)
    lc = run_steps(comp, batches())
    compare(eager, comp, le, lc)
    assert mon.read()["graph_breaks"] == 0


def test_compile_true_means_model_and_modes_are_checked():
    from dino_fast.train.presets import resolve
    assert resolve("demo", {"compile": True}).compile == "model"
    assert resolve("demo", {"compile": "blocks"}).compile == "blocks"
    assert resolve("demo", {"compile": "off"}).compile is False
    with pytest.raises(ConfigError, match="--compile 'graph': choose false, blocks or model"):
        resolve("demo", {"compile": "graph"})


@pytest.mark.parametrize("attention,efficient", [("sdpa", False), ("sdpa", True), ("math", True)])
def test_blocks_no_graph_break_and_no_recompile_across_epochs(attention, efficient):
    st = make_state(compile="blocks", attention=attention, drop_path_rate=0.2, efficient_drop_path=efficient)
    mon = CompileMonitor()
    data = batches(3)
    from dino_fast.train.step import train_step
    train_step(st, data[0], it=0, epoch=0)
    first = mon.read()
    # student: block 0 (drop rate 0) and block 1 (0.2), train mode; teacher: eval mode
    assert first["graphs"] == 3, first
    assert first["graph_breaks"] == 0, first["break_reasons"]
    for i, crops in enumerate(data[1:], 1):   # epoch 2: same layout, new draws of the drop path
        train_step(st, crops, it=i, epoch=1)
    again = mon.read()
    assert again == {"graphs": 0, "graph_breaks": 0, "break_reasons": {}}, again


def test_teacher_blocks_flex_attention_forward():
    """flex on the CPU has no backward: the compiled teacher forward, against eager."""
    st = make_state(attention="flex")
    crops = batches(1)[0][:2]
    with torch.no_grad():
        want = st.teacher(crops)
        compile_blocks(st.teacher, backend="aot_eager")
        mon = CompileMonitor()
        got = st.teacher(crops)
    r = mon.read()
    assert r["graphs"] == 1 and r["graph_breaks"] == 0, r
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_block_compiled_with_inductor_matches_eager():
    from dino_fast.model.layout import PackedLayout
    from dino_fast.model.vit import Block
    torch.manual_seed(0)
    blk = Block(16, 2, qkv_bias=True).eval()
    layout = PackedLayout((2, 3), (5, 2))
    x = torch.randn(layout.total_tokens, 16)
    with torch.no_grad():
        want = blk(x, layout)
        compile_blocks(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([blk])}))
        mon = CompileMonitor()
        got = blk(x, layout)
    assert mon.read()["graphs"] == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_graph_teacher_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the option is valid here")
    with pytest.raises(ConfigError, match="--cuda_graph_teacher needs a CUDA GPU"):
        make_state(cuda_graph_teacher=True)


# ---------------------------------------------------------------- FSDP2 + per-block compile
def _fsdp_blocks(rank, world, out):
    torch.set_num_threads(1)
    st = make_state(world=world, use_fsdp=True, compile="blocks", activation_checkpointing="selective")
    mon = CompileMonitor()
    losses = torch.tensor(run_steps(st, batches(2, rank, world)))
    torch.distributed.all_reduce(losses)   # each rank's loss is the mean over its half of the batch
    losses = (losses / world).tolist()
    r = mon.read()
    state = {"losses": losses, "student": full(st.student.state_dict()), "teacher": full(st.teacher.state_dict()),
             "center": st.dino_loss.center.clone(), "compile": r}
    if rank == 0:
        torch.save(state, out)


def test_fsdp2_per_block_compile_two_processes(tmp_path):
    out = os.path.join(tmp_path, "fsdp.pt")
    run_distributed(_fsdp_blocks, out, world_size=2)
    got = torch.load(out)
    assert got["compile"]["graph_breaks"] == 0, got["compile"]["break_reasons"]
    assert got["compile"]["graphs"] >= 2
    ref = make_state()
    want = run_steps(ref, batches(2))
    assert got["losses"] == pytest.approx(want, rel=1e-5)
    for part in ("student", "teacher"):
        sd = full(getattr(ref, part).state_dict())
        for k, v in sd.items():
            torch.testing.assert_close(got[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    torch.testing.assert_close(got["center"], ref.dino_loss.center, rtol=1e-5, atol=1e-6)
    assert B % 2 == 0 and CFG["batch_size_per_gpu"] == B


def test_monitor_logs_recompiles_after_the_first_epoch(caplog):
    fn = torch.compile(lambda t: t * 2 + 1, backend="aot_eager", dynamic=False)
    mon = CompileMonitor()
    fn(torch.ones(3))
    with caplog.at_level("INFO", logger="dino_fast.train.compile"):
        first = mon.log_epoch(0, first=True)
        fn(torch.ones(3))
        quiet = mon.log_epoch(1, first=False)
        fn(torch.ones(5))                      # a new shape: a recompile
        again = mon.log_epoch(2, first=False)
    assert (first["graphs"], quiet["graphs"], again["graphs"]) == (1, 0, 1)
    levels = [(r.levelname, "recompiles after warm-up" in r.getMessage()) for r in caplog.records]
    assert levels == [("INFO", False), ("WARNING", True)]
