"""dino_fast.model against the reference re-implementation (tests/reference_vit.py):
parameter names, fp32 outputs and gradients, positional interpolation,
attention maps, intermediate layers, the DINO head, stochastic depth,
activation checkpointing, torch.compile and the FLOP count."""
import copy

import pytest
import torch

import dino_fast.model as dm
import tests.reference_vit as ref
from dino_fast.model.flops import vit_forward_flops, dino_step_flops_per_image
from dino_fast.model.layout import PackedLayout
from dino_fast.model.vit import drop_path_packed

RTOL = 1e-5  # fp32, relative to the largest reference magnitude


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def pair(arch, patch, **kw):
    """A reference model and ours with the reference's weights (strict load)."""
    r = getattr(ref, arch)(patch_size=patch, **kw).eval()
    m = getattr(dm, arch)(patch_size=patch, attention="math", **kw).eval()
    m.load_state_dict(r.state_dict(), strict=True)
    return r, m


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small", "vit_base"])
def test_parameter_names_and_shapes_match_reference(arch):
    with torch.device("meta"):  # names and shapes only: skip the init cost
        r = getattr(ref, arch)(patch_size=8)
        m = getattr(dm, arch)(patch_size=8)
    rs, ms = r.state_dict(), m.state_dict()
    assert list(rs) == list(ms)
    assert all(rs[k].shape == ms[k].shape for k in rs)
    assert m.embed_dim == r.embed_dim and len(m.blocks) == 12
    assert "blocks.11.attn.qkv.weight" in ms and "patch_embed.proj.weight" in ms and "pos_embed" in ms


@pytest.mark.parametrize("arch,patch,size,depth", [("vit_tiny", 8, 32, 12), ("vit_small", 16, 32, 6),
                                                   ("vit_base", 8, 16, 3)])
def test_forward_matches_reference_fp32(arch, patch, size, depth):
    r, m = pair(arch, patch, depth=depth)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert rel_err(m(x), r(x)) < RTOL
        assert rel_err(m.get_last_selfattention(x), r.get_last_selfattention(x)) < RTOL
        for a, b in zip(m.get_intermediate_layers(x, n=3), r.get_intermediate_layers(x, n=3)):
            assert a.shape == b.shape and rel_err(a, b) < RTOL


@pytest.mark.parametrize("hw", [(40, 24), (35, 27), (16, 48), (9, 9), (64, 64)])
def test_interpolate_pos_encoding_non_square_and_non_divisible(hw):
    r, m = pair("vit_tiny", 8, depth=2, img_size=[32])
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        tok = torch.zeros(1, 1 + (hw[0] // 8) * (hw[1] // 8), 192)
        assert torch.equal(m.interpolate_pos_encoding(tok, *hw), r.interpolate_pos_encoding(tok, *hw))
        assert rel_err(m(x), r(x)) < RTOL


def test_multicrop_wrapper_matches_reference_forward_and_backward():
    torch.manual_seed(0)
    rb, mb = pair("vit_small", 8, depth=4)
    rh = ref.DINOHead(384, 257, hidden_dim=64, bottleneck_dim=32)
    mh = dm.DINOHead(384, 257, hidden_dim=64, bottleneck_dim=32)
    mh.load_state_dict(rh.state_dict(), strict=True)
    rw, mw = ref.MultiCropWrapper(rb, rh).train(), dm.MultiCropWrapper(mb, mh).train()
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(10)]
    out_r, out_m = rw(crops), mw(crops)
    assert out_m.shape == (24, 257) and rel_err(out_m, out_r) < RTOL
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_m.backward(g)
    gr = {n: p.grad for n, p in rw.named_parameters() if p.requires_grad}
    gm = {n: p.grad for n, p in mw.named_parameters() if p.requires_grad}
    assert sorted(gr) == sorted(gm)
    for n in gr:
        assert rel_err(gm[n], gr[n]) < 1e-4, n


def test_head_matches_reference_and_freezes_weight_g():
    torch.manual_seed(0)
    for kw in [dict(), dict(norm_last_layer=False), dict(nlayers=1), dict(use_bn=True, nlayers=4)]:
        rh = ref.DINOHead(48, 1000, hidden_dim=96, bottleneck_dim=24, **kw).train()
        mh = dm.DINOHead(48, 1000, hidden_dim=96, bottleneck_dim=24, **kw).train()
        assert list(rh.state_dict()) == list(mh.state_dict())
        assert mh.last_layer.weight_g.shape == (1000, 1) and torch.all(mh.last_layer.weight_g == 1)
        frozen = kw.get("norm_last_layer", True)
        assert mh.last_layer.weight_g.requires_grad is (not frozen)
        assert rh.last_layer.weight_g.requires_grad is (not frozen)
        rh.last_layer.weight_g.data.uniform_(0.5, 2)  # exercise g, not only the fill value
        mh.load_state_dict(rh.state_dict(), strict=True)
        x = torch.randn(7, 48)
        yr, ym = rh(x), mh(x)
        assert rel_err(ym, yr) < RTOL
        yr.square().sum().backward()
        ym.square().sum().backward()
        assert rel_err(mh.last_layer.weight_v.grad, rh.last_layer.weight_v.grad) < 1e-4
    # a deep copy (teacher = deepcopy(student)) works, unlike the weight_norm hook after a forward
    copy.deepcopy(mh)


def test_head_initialisation_statistics():
    torch.manual_seed(0)
    h = dm.DINOHead(384, 4096)
    w = h.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    assert torch.all(h.mlp[0].bias == 0) and torch.all(h.mlp[4].bias == 0)
    out = h(torch.randn(5, 384))
    # L2-normalized input and g == 1: every logit is a cosine, |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5


def test_drop_path_packed_equals_per_group_reference_draws():
    """Same generator state: one uniform per packed row, in packed row order,
    equals the reference's per-sample draw group by group."""
    layout = PackedLayout((4, 10), (17, 5))
    y = torch.randn(layout.total_tokens, 8)
    torch.manual_seed(123)
    packed = drop_path_packed(y, layout, 0.3, True)
    torch.manual_seed(123)
    per_group = [ref.drop_path(y[s:e].view(r, n, 8), 0.3, True).reshape(-1, 8) for _, s, e, r, n in layout.groups()]
    assert torch.equal(packed, torch.cat(per_group))


def test_drop_path_statistics_per_row():
    layout = PackedLayout((600, 1400), (9, 3))
    y = torch.ones(layout.total_tokens, 4)
    torch.manual_seed(0)
    out = drop_path_packed(y, layout, 0.25, True)
    kept = []
    for _, s, e, r, n in layout.groups():
        g = out[s:e].view(r, n * 4)
        # every token of a row shares the row's fate: all 0 or all 1/(1-p)
        assert torch.all((g == 0).all(1) | (g == 1 / 0.75).all(1))
        kept.append((g[:, 0] > 0).float())
    frac = torch.cat(kept).mean().item()
    assert abs(frac - 0.75) < 0.03  # 2000 rows: 3 sigma ~ 0.029
    assert drop_path_packed(y, layout, 0.25, False) is y


def test_drop_path_rates_and_training_stats():
    m = dm.vit_tiny(patch_size=8, depth=4, drop_path_rate=0.3)
    assert [b.drop_path.drop_prob for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)  # eval: no dropping
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x), a)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_activation_checkpointing_same_gradients(backend):
    torch.manual_seed(0)
    m = dm.vit_tiny(patch_size=8, depth=3, attention=backend, drop_path_rate=0.2).train()
    mc = copy.deepcopy(m)
    mc.use_checkpoint = True
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    torch.manual_seed(5)
    m(crops).square().sum().backward()
    torch.manual_seed(5)
    mc(crops).square().sum().backward()  # drop-path masks replayed in the recompute
    for (n, p), q in zip(m.named_parameters(), mc.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n
    assert dm.vit_tiny(activation_checkpointing=True).use_checkpoint


def test_torch_compile_with_checkpointing():
    torch.manual_seed(0)
    m = dm.vit_tiny(patch_size=8, depth=1, attention="sdpa", use_checkpoint=True).train()
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    eager = m(crops)
    # a random projection, not .sum(): the sum of a LayerNorm's output has a ~1e-8 (round-off) gradient
    w = torch.randn_like(eager)
    (eager * w).sum().backward()
    g = m.blocks[0].mlp.fc1.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(crops)
    (out * w).sum().backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    # fp32 round-off of a differently ordered backward: relative to the gradient's scale
    torch.testing.assert_close(m.blocks[0].mlp.fc1.weight.grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_flops_match_flop_counter_and_design_figures():
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = dm.vit_base(patch_size=8, attention="math")
    for size in (224, 96):
        with FlopCounterMode(display=False) as fc:
            m(torch.empty(1, 3, size, size, device="meta"))
        counted = fc.get_total_flops()
        est = vit_forward_flops(m, size)
        assert abs(est - counted) / counted < 0.002, (size, est, counted)
    assert vit_forward_flops(m, 224) / 1e9 == pytest.approx(156.4, rel=0.01)
    assert vit_forward_flops(m, 96) / 1e9 == pytest.approx(25.5, rel=0.01)
    step = dino_step_flops_per_image(m, 224, 96, 2, 10)
    assert step / 1e12 == pytest.approx(2.0, rel=0.02)
    with torch.device("meta"):
        w = dm.MultiCropWrapper(m, dm.DINOHead(768, 65536))
    # the head adds 46 MFLOP per crop forward: 2 * (768*2048 + 2048^2 + 2048*256 + 256*65536)
    head = 2 * (768 * 2048 + 2048 ** 2 + 2048 * 256 + 256 * 65536)
    assert dm.flops_per_image(w) == pytest.approx(step + (3 * 12 + 2) * head, rel=1e-9)


def _fsdp2_worker(rank, world_size, out_path):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    torch.manual_seed(0)
    model = dm.vit_tiny(patch_size=8, depth=2, attention="sdpa", drop_path_rate=0.1)
    want_model = copy.deepcopy(model)
    # bf16 parameters make FSDP2 cast every block's forward inputs, which rebuilds
    # the PackedLayout dataclass argument (dataclasses.replace)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in model.blocks:
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    model.eval()
    want_model.eval()
    out = model(crops).float()
    want = want_model(crops)
    out.sum().backward()
    g = model.blocks[0].attn.qkv.weight.grad.full_tensor()
    if rank == 0:
        torch.save({"out": out.detach(), "want": want.detach(), "grad_finite": bool(torch.isfinite(g).all())},
                   out_path)


def test_fsdp2_fully_shard_per_block_packed_forward(tmp_path):
    from tests._dist import run_distributed
    path = str(tmp_path / "fsdp.pt")
    run_distributed(_fsdp2_worker, path, world_size=2)
    res = torch.load(path)
    assert res["out"].shape == (6, 192) and res["grad_finite"]
    assert (res["out"] - res["want"]).abs().max() <= 3e-2 * res["want"].abs().max()
