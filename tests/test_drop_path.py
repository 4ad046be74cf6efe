"""--efficient_drop_path: the residual branches run on the kept rows only (DINOv2 / DINOv3's
drop_add_residual_stochastic_depth on the packed sequence).

- Exact for a fixed draw: with the same kept rows, the ViT equals the masking formulation
  x + m * f(x) (m = R_g / k_g on kept rows, 0 elsewhere, written here from the rows), forward and
  gradients, with registers, LayerScale, RoPE and both resolution groups.
- Unbiased: over many draws the mean of x + drop(f(x)) is x + f(x), within 5 standard errors
  of the analytic variance f^2 (R/k - 1) / N; each row is kept with frequency k/R.
"""
from __future__ import annotations

import pytest
import torch

import dino_fast.model.drop_path as dp
import dino_fast.model.vit as vit_mod
from dino_fast.model.layout import PackedLayout
from dino_fast.model.vit import vit_tiny


def test_kept_rows_is_dinov2s_subset_size():
    for rows, p in [(8, 0.1), (8, 0.5), (1, 0.3), (24, 0.4), (3, 0.9)]:
        assert dp.kept_rows(rows, p) == max(int(rows * (1 - p)), 1)
    assert dp.kept_layout(PackedLayout((8, 16), (5, 2)), 0.25) == PackedLayout((6, 12), (5, 2))


def _mask(layout: PackedLayout, rows: list[torch.Tensor]) -> torch.Tensor:
    """(T,) per-token factor of the masking formulation: R_g / k_g on kept rows, 0 elsewhere."""
    m = torch.zeros(layout.total_tokens)
    for g, (R, n) in enumerate(zip(layout.rows, layout.tokens)):
        start = sum(r * t for r, t in zip(layout.rows[:g], layout.tokens[:g]))
        for row in rows[g].tolist():
            m[start + row * n:start + (row + 1) * n] = R / len(rows[g])
    return m


@pytest.mark.parametrize("variant", ["plain", "dinov3"])
def test_efficient_equals_masking_for_a_fixed_draw(monkeypatch, variant):
    torch.set_num_threads(1)
    kw = dict(num_register_tokens=2, layerscale_init=0.1, pos_embed="rope") if variant == "dinov3" else {}
    torch.manual_seed(0)
    eff = vit_tiny(patch_size=4, depth=3, drop_path_rate=0.5, attention="sdpa", efficient_drop_path=True, **kw)
    ref = vit_tiny(patch_size=4, depth=3, drop_path_rate=0.5, attention="sdpa", **kw)
    ref.load_state_dict(eff.state_dict())
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]  # groups of 6 and 3 rows
    gen = torch.Generator().manual_seed(7)
    draws = []  # one per residual branch of the blocks that drop (block 0 has rate 0)

    def fixed_draw(layout, p, device):
        rows = [torch.randperm(r, generator=gen)[:dp.kept_rows(r, p)] for r in layout.rows]
        draws.append((layout, rows))
        return rows
    monkeypatch.setattr(dp, "draw_rows", fixed_draw)
    out_eff = eff.train()(crops)
    assert len(draws) == 4   # blocks 1 and 2, attention and FFN

    replay = iter(draws)

    def masked(y, layout, p, training):
        if p == 0.0:
            return y
        lay, rows = next(replay)
        assert lay == layout and training
        return y * _mask(layout, rows)[:, None]
    monkeypatch.setattr(vit_mod, "drop_path_packed", masked)
    out_ref = ref.train()(crops)
    torch.testing.assert_close(out_eff, out_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out_eff)
    (out_eff * w).sum().backward()
    (out_ref * w).sum().backward()
    for (n, a), (_, b) in zip(eff.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")


def test_unbiased_over_draws():
    torch.manual_seed(0)
    layout = PackedLayout((6, 5), (3, 2))       # k = 4 of 6 rows and 3 of 5 rows at p = 0.3
    x = torch.randn(layout.total_tokens, 4, dtype=torch.float64)
    W = torch.randn(4, 4, dtype=torch.float64)

    def branch(xs, lay, aux, rope):             # row-local (per token) branch
        return torch.tanh(xs @ W)
    n, p = 4000, 0.3
    total = torch.zeros_like(x)
    kept = torch.zeros(layout.total_rows)
    for _ in range(n):
        rows = dp.draw_rows(layout, p, x.device)
        assert [len(r) for r in rows] == [4, 3] and all(len(set(r.tolist())) == len(r) for r in rows)
        kept[rows[0]] += 1
        kept[layout.rows[0] + rows[1]] += 1
        total += dp.drop_add_residual_packed(x, layout, branch, p, rows=rows)
    f = branch(x, layout, None, None)
    ratio = torch.cat([torch.full((6 * 3,), 6 / 4), torch.full((5 * 2,), 5 / 3)]).double()[:, None]
    sigma = f.abs() * ((ratio - 1) / n).sqrt()
    err = (total / n - (x + f)).abs()
    assert (err <= 5 * sigma + 1e-12).all(), (err / sigma).max()
    freq = kept / n
    torch.testing.assert_close(freq[:6], torch.full((6,), 4 / 6), atol=0.03, rtol=0)
    torch.testing.assert_close(freq[6:], torch.full((5,), 3 / 5), atol=0.03, rtol=0)


def test_no_drop_in_eval_or_at_rate_zero():
    torch.manual_seed(0)
    m = vit_tiny(patch_size=4, depth=2, drop_path_rate=0.5, attention="sdpa", efficient_drop_path=True)
    plain = vit_tiny(patch_size=4, depth=2, drop_path_rate=0.0, attention="sdpa")
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert not m.blocks[0].drops_rows() and m.blocks[1].drops_rows()
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), plain.eval()(x))


def test_one_launch_backend_gets_the_kept_layout_mask(monkeypatch):
    """flex (a block mask per layout): the kept rows' mask is built for the kept layout; the same
    draws give the sdpa result (train mode, no grad: flex has no CPU backward)."""
    torch.manual_seed(0)
    flex = vit_tiny(patch_size=4, depth=2, drop_path_rate=0.5, attention="flex", efficient_drop_path=True).train()
    sdpa = vit_tiny(patch_size=4, depth=2, drop_path_rate=0.5, attention="sdpa", efficient_drop_path=True).train()
    sdpa.load_state_dict(flex.state_dict())
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    seen = []
    real_aux = vit_mod.attention_aux
    monkeypatch.setattr(vit_mod, "attention_aux", lambda lay, b, d: seen.append(lay) or real_aux(lay, b, d))
    with torch.no_grad():
        torch.manual_seed(3)
        a = flex(crops)
        torch.manual_seed(3)
        b = sdpa(crops)
    assert PackedLayout((2, 1), (17, 5)) in seen   # 4 -> 2 and 2 -> 1 rows at p = 0.5
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [False, "selective", "full"])
def test_memory_plan_counts_the_kept_rows_only(mode):
    """--dry_run's plan with --efficient_drop_path: block i keeps the activations of (1 - p_i) of
    the rows (p = 0, 0.25, 0.5 over 3 blocks; 8 rows per group, so k = R (1 - p) exactly);
    it equals what the forward keeps alive (measured as in test_checkpointing) to within 1 %."""
    from dino_fast.model import DINOHead, MultiCropWrapper
    from dino_fast.model.vit import vit_small
    from dino_fast.runtime.memory import memory_plan
    from tests.test_checkpointing import retained_bytes
    depth, b, k, n_local = 3, 4, 1000, 2
    torch.manual_seed(0)
    model = MultiCropWrapper(vit_small(16, depth=depth, attention="sdpa", drop_path_rate=0.5, efficient_drop_path=True,
                                       activation_checkpointing=mode), DINOHead(384, k)).train()
    crops = [torch.randn(b, 3, 224, 224) for _ in range(2)] + [torch.randn(b, 3, 96, 96) for _ in range(n_local)]
    measured, _ = retained_bytes(model, crops)
    kw = dict(depth=depth, batch_size_per_gpu=b, n_local=n_local, precision="fp32", attention="sdpa",
              activation_checkpointing=mode, gpu_memory=80)
    plan = memory_plan("vit_small", 16, k, efficient_drop_path_rate=0.5, **kw)
    estimate = b * (plan.activations_per_image() + plan.head_per_image) + plan.fixed_bytes
    assert estimate == pytest.approx(measured, rel=0.01)
    masking = memory_plan("vit_small", 16, k, **kw)
    if mode == "full":
        assert plan.activations_per_image() == masking.activations_per_image()
    else:
        assert plan.activations_per_image() < 0.85 * masking.activations_per_image()
