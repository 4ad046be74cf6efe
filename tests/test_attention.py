"""Packed block-diagonal attention == per-group attention, on every backend
that runs here (forward and backward), and the whole packed model == the
reference per-group MultiCropWrapper. GPU-only backends (xformers, flash
varlen) run where CUDA (and xformers) are present."""
import importlib.util

import pytest
import torch

import dino_fast.model as dm
import tests.reference_vit as ref
from dino_fast.model.attention import has_varlen, packed_attention, resolve_backend
from dino_fast.model.layout import PackedLayout
from tests.conftest import HAS_CUDA

HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
CPU_BACKENDS = ["math", "sdpa", "flex"]
# flex_attention has no CPU backward (NotImplementedError in torch): forward only there
NO_CPU_BACKWARD = {"flex"}
LAYOUTS = {
    "2g+10l": PackedLayout((4, 20), (17, 5)),      # 2 globals + 10 locals, B=2
    "1g+1l": PackedLayout((1, 1), (10, 3)),        # batch 1, one local
    "single": PackedLayout.single(3, 7),           # plain batch, one resolution
    "3groups": PackedLayout((2, 6, 2), (9, 4, 9)),  # non-consecutive equal sizes
}


def rows_reference(qkv, layout, heads, scale):
    """Attention of every row on its own, explicit softmax, float64."""
    T, three_d = qkv.shape
    D = three_d // 3
    hd = D // heads
    outs, start = [], 0
    for n in layout.seqlens:
        q, k, v = qkv[start:start + n].double().view(n, 3, heads, hd).permute(1, 2, 0, 3)  # (H, n, hd)
        p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        outs.append((p @ v).transpose(0, 1).reshape(n, D))
        start += n
    return torch.cat(outs)


def _check_backend(backend, device, dtype, tol):
    heads, hd = 3, 16
    for name, layout in LAYOUTS.items():
        torch.manual_seed(0)
        qkv = torch.randn(layout.total_tokens, 3 * heads * hd, device=device, dtype=dtype, requires_grad=True)
        scale = hd ** -0.5
        want = rows_reference(qkv.detach(), layout, heads, scale)
        grad_backward = device.type == "cuda" or backend not in NO_CPU_BACKWARD
        with torch.set_grad_enabled(grad_backward):
            out = packed_attention(qkv if grad_backward else qkv.detach(), layout, heads, scale, backend)
        assert out.shape == (layout.total_tokens, heads * hd)
        err = (out.double() - want).abs().max().item()
        assert err < tol, (backend, name, err)
        if grad_backward:
            g = torch.randn_like(out)
            (gq,) = torch.autograd.grad(out, qkv, g)
            q64 = qkv.detach().double().requires_grad_()
            (gw,) = torch.autograd.grad(rows_reference(q64, layout, heads, scale), q64, g.double())
            gerr = (gq.double() - gw).abs().max().item() / gw.abs().max().item()
            assert gerr < 10 * tol, (backend, name, gerr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_attention_equals_per_row_cpu_fp32(backend):
    _check_backend(backend, torch.device("cpu"), torch.float32, 2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["math", "sdpa", "flex", "flash", "xformers"])
def test_packed_attention_equals_per_row_cuda_bf16(backend):
    if backend == "xformers" and not HAS_XFORMERS:
        pytest.skip("xformers is not installed")
    if backend == "flash" and not has_varlen():
        pytest.skip("torch.nn.attention.varlen is not in this torch")
    _check_backend(backend, torch.device("cuda"), torch.bfloat16, 3e-2)


def test_resolve_backend():
    assert resolve_backend("math") == "math" and resolve_backend("sdpa") == "sdpa"
    want = "xformers" if (HAS_CUDA and HAS_XFORMERS) else "sdpa"
    assert resolve_backend("auto") == want
    with pytest.raises(ValueError, match="attention='bogus'"):
        resolve_backend("bogus")
    if not HAS_XFORMERS:
        with pytest.raises(ValueError, match="xformers is not installed"):
            resolve_backend("xformers")


def test_cuda_only_backend_falls_back_on_cpu_tensors():
    layout = LAYOUTS["2g+10l"]
    qkv = torch.randn(layout.total_tokens, 48)
    want = packed_attention(qkv, layout, 2, 0.25, "math")
    got = packed_attention(qkv, layout, 2, 0.25, "flash") if has_varlen() else want
    assert torch.allclose(got, want, atol=1e-5)


CROPS = {
    "2g+10l": [(2, 32, 32)] * 2 + [(2, 16, 16)] * 10,
    "2g+1l": [(2, 32, 32)] * 2 + [(2, 16, 16)],
    "nonsquare": [(3, 32, 24)] * 2 + [(3, 16, 20)] * 3 + [(3, 13, 19)],  # interpolated grids
    "batch1": [(1, 24, 24)],
}


MODEL_CASES = [(b, c) for b in ("math", "sdpa") for c in sorted(CROPS)] + [("flex", "2g+10l"), ("flex", "nonsquare")]


@pytest.mark.parametrize("backend,case", MODEL_CASES)
def test_packed_model_equals_reference_per_group(backend, case):
    """Whole wrapper: packed forward (+ backward) == reference per-group wrapper."""
    torch.manual_seed(0)
    rb = ref.vit_tiny(patch_size=8, depth=2, img_size=[32])
    rh = ref.DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    mb = dm.vit_tiny(patch_size=8, depth=2, img_size=[32], attention=backend)
    mh = dm.DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    mb.load_state_dict(rb.state_dict(), strict=True)
    mh.load_state_dict(rh.state_dict(), strict=True)
    rw, mw = ref.MultiCropWrapper(rb, rh), dm.MultiCropWrapper(mb, mh)
    crops = [torch.randn(b, 3, h, w) for b, h, w in CROPS[case]]
    backward = backend not in NO_CPU_BACKWARD
    want = rw(crops)
    with torch.set_grad_enabled(backward):
        got = mw(crops)
    assert got.shape == want.shape == (sum(c.shape[0] for c in crops), 64)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    if backward:
        g = torch.randn_like(want)
        want.backward(g)
        got.backward(g)
        for (n, p), q in zip(rw.named_parameters(), mw.parameters()):
            if p.requires_grad:
                assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-9, n


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_equals_per_group_wrapper_same_model(backend):
    """MultiCropWrapper(packed=True) == MultiCropWrapper(packed=False) on one model."""
    torch.manual_seed(0)
    mb = dm.vit_tiny(patch_size=8, depth=2, attention=backend)
    w = dm.MultiCropWrapper(mb, dm.DINOHead(192, 40, hidden_dim=32, bottleneck_dim=16))
    crops = [torch.randn(2, 3, 24, 24)] * 2 + [torch.randn(2, 3, 8, 8) for _ in range(5)]
    w.packed = False
    a = w(crops)
    w.packed = True
    b = w(crops)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash", "xformers"])
def test_packed_model_equals_reference_per_group_cuda(backend):
    """On the GPU: packed model (bf16 autocast) vs the reference per-group model
    (fp32), forward and the gradient of the patch embedding."""
    if backend == "xformers" and not HAS_XFORMERS:
        pytest.skip("xformers is not installed")
    if backend == "flash" and not has_varlen():
        pytest.skip("torch.nn.attention.varlen is not in this torch")
    torch.manual_seed(0)
    rb = ref.vit_small(patch_size=8, depth=4).cuda()
    mb = dm.vit_small(patch_size=8, depth=4, attention=backend).cuda()
    mb.load_state_dict(rb.state_dict(), strict=True)
    crops = [torch.randn(4, 3, 64, 64, device="cuda")] * 2 + [torch.randn(4, 3, 32, 32, device="cuda")] * 10
    want = torch.cat([rb(torch.cat(crops[:2])), rb(torch.cat(crops[2:]))])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = mb(crops).float()
    assert (got - want).abs().max() <= 5e-2 * want.abs().max(), backend
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    gr, gm = rb.patch_embed.proj.weight.grad, mb.patch_embed.proj.weight.grad
    assert (gm - gr).abs().max() <= 1e-1 * gr.abs().max(), backend
