"""Released-weight layouts against timm's own implementations (independent of dino-fast's code).

timm DINOv2 (plain, reg4, the ViT-g SwiGLU layout) and DINOv3 (Eva: plain, qkv-bias, SwiGLU,
the 7B layout) models with random weights, LayerScale gammas drawn large so every block matters,
saved as state dicts: `dino_fast.load` reads them and gives timm's `forward_features(x)[:, 0]`
within 1e-4 relative; the same weights in the official DINOv2 / DINOv3 key layouts (converted
from timm's names by the explicit mappings written below, themselves checked with timm's own
converters) load too; intermediate layers and last-block attention equal timm's; every export
layout loads back (into timm models with strict=True where timm has the layout).
"""
import math
import re

import pytest
import torch

import dino_fast
from dino_fast.eval.export import export_checkpoint
from dino_fast.eval.load import load_with_config

timm = pytest.importorskip("timm")
RTOL = 1e-4

# name -> (create_model kwargs, image sizes (H, W) to compare at)
DINOV2 = {
    "vit_small_patch14_dinov2": (dict(img_size=56), [(56, 56)]),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=56), [(56, 56)]),
    "vit_giant_patch14_dinov2": (dict(img_size=42, embed_dim=192, num_heads=3), [(42, 42)]),  # w12 / w3
}
DINOV3 = {
    "vit_small_patch16_dinov3": (dict(), [(48, 48), (32, 80)]),
    "vit_small_patch16_dinov3_qkvb": (dict(), [(64, 48)]),
    "vit_small_plus_patch16_dinov3": (dict(), [(48, 48)]),                       # SwiGLU w1/w2/w3
    "vit_7b_patch16_dinov3": (dict(embed_dim=256, num_heads=4), [(32, 48)]),   # SwiGLU aligned to 64, no qkv bias
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, seed=0):
    """Random weights with large LayerScale gammas, non-zero biases, tokens and norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)              # U(0.5, 1.5)
            elif name.endswith(("cls_token", "reg_token", "pos_embed")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_timm(name, **kw):
    torch.manual_seed(0)
    return randomize(timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw))


def save(sd, path):
    torch.save({k: v.clone() for k, v in sd.items()}, path)
    return str(path)


def timm_cls(t, x):
    with torch.no_grad():
        return t.forward_features(x)[:, 0]


# ---------------------------------------------------------------- explicit official layouts
def timm_to_official_dinov2(sd):
    """timm's DINOv2 names -> facebookresearch/dinov2 `DinoVisionTransformer` names: reg_token ->
    register_tokens, and (timm builds reg4 models with no_embed_class, the CLS position folded into
    cls_token) a zero CLS position in front of pos_embed; the packed SwiGLU fc1/fc2 -> w12/w3; a
    mask_token (zeros, unused at inference)."""
    out = {}
    packed = sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
    for k, v in sd.items():
        if k == "reg_token":
            out["register_tokens"] = v
            continue
        if packed:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v
    if "register_tokens" in out:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def timm_to_official_dinov3(sd, head_dim, base=100.0):
    """timm's Eva DINOv3 names -> facebookresearch/dinov3 `DinoVisionTransformer` names:
    reg_token -> storage_tokens, gamma_1/2 -> ls1/ls2.gamma, q_bias/v_bias -> qkv.bias [q, 0, v]
    with its bias_mask [1, 0, 1] (mask_k_bias), SwiGLU fc1_g/fc1_x/fc2 -> w1/w2/w3, plus the
    persistent rope_embed.periods = base^(2k / (hd/2)) and a zero mask_token."""
    out = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["storage_tokens"] = v
            continue
        m = re.match(r"(blocks\.\d+\.)gamma_([12])$", k)
        if m:
            out[f"{m.group(1)}ls{m.group(2)}.gamma"] = v
            continue
        if k.endswith("attn.q_bias"):
            q, vb = v, sd[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat((q, torch.zeros_like(q), vb))
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.cat((torch.ones_like(q), torch.zeros_like(q),
                                                                   torch.ones_like(q)))
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
        if "blocks.0.mlp.fc1_g.weight" in sd:
            k = k.replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v
    n = head_dim // 4
    out["rope_embed.periods"] = base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


# ---------------------------------------------------------------- CLS features
@pytest.mark.parametrize("name", list(DINOV2) + list(DINOV3))
def test_timm_state_dict_loads_with_timm_features(name, tmp_path):
    kw, sizes = {**DINOV2, **DINOV3}[name]
    t = make_timm(name, **kw)
    path = save(t.state_dict(), tmp_path / "timm.pth")
    for backend in ("math", "sdpa"):
        m, cfg = load_with_config(path, attention=backend)
        assert cfg.depth == 2 and cfg.embed_dim == t.embed_dim and cfg.num_heads == t.blocks[0].attn.num_heads
        assert cfg.num_register_tokens == (4 if "reg4" in name or "dinov3" in name else 0)
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            with torch.no_grad():
                got = m(x)
            assert rel_err(got, timm_cls(t, x)) < RTOL, (name, backend, (h, w))


@pytest.mark.parametrize("name", list(DINOV2))
def test_official_dinov2_layout_loads(name, tmp_path):
    kw, sizes = DINOV2[name]
    t = make_timm(name, **kw)
    official = timm_to_official_dinov2(t.state_dict())
    assert "mask_token" in official and ("register_tokens" in official) == ("reg4" in name)
    assert ("blocks.0.mlp.w12.weight" in official) == ("giant" in name)
    # the mapping is the inverse of timm's own DINOv2 converter (checked with timm's code)
    t2 = timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn
    t2.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in official.items()}, t2), strict=True)
    path = save(official, tmp_path / "dinov2.pth")
    m, cfg = load_with_config(path, attention="math")
    assert cfg.layout == "dinov2" and cfg.mask_token
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        want = timm_cls(t, x)
        assert rel_err(timm_cls(t2, x), want) < 1e-6
        with torch.no_grad():
            assert rel_err(m(x), want) < RTOL


@pytest.mark.parametrize("name", list(DINOV3))
def test_official_dinov3_layout_loads(name, tmp_path):
    kw, sizes = DINOV3[name]
    t = make_timm(name, **kw)
    hd = t.embed_dim // t.blocks[0].attn.num_heads
    official = timm_to_official_dinov3(t.state_dict(), hd)
    # the mapping is the inverse of timm's own DINOv3 converter (checked with timm's code)
    from timm.models.eva import checkpoint_filter_fn
    t2 = timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw).eval()
    t2.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in official.items()}, t2), strict=True)
    path = save(official, tmp_path / "dinov3.pth")
    m, cfg = load_with_config(path, attention="sdpa")
    assert cfg.layout == "dinov3" and cfg.pos_embed == "rope" and cfg.rope_base == 100.0
    assert cfg.mask_k_bias == ("qkvb" in name)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        want = timm_cls(t, x)
        assert rel_err(timm_cls(t2, x), want) < 1e-6
        with torch.no_grad():
            assert rel_err(m(x), want) < RTOL


def test_dinov2_reg4_other_sizes_match_timm_dynamic_resize(tmp_path):
    """Registers: the position embedding is resized to the exact grid with antialiased bicubic
    (DINOv2's released register models; timm's dynamic_img_size)."""
    t = make_timm("vit_small_patch14_reg4_dinov2", img_size=56, dynamic_img_size=True)
    m = dino_fast.load(save(t.state_dict(), tmp_path / "t.pth"), attention="math")
    for h, w in [(42, 70), (98, 98)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert rel_err(m(x), timm_cls(t, x)) < RTOL, (h, w)


# ---------------------------------------------------------------- other outputs
def _timm_last_attention(t, x):
    """Last-block softmax(q k^T / sqrt(hd)) computed from timm's own modules and RoPE."""
    seen = {}
    hook = t.blocks[-1].attn.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0]),
                                                       with_kwargs=True)
    with torch.no_grad():
        t.forward_features(x)
    hook.remove()
    a, y = t.blocks[-1].attn, seen["x"]
    B, N, C = y.shape
    if hasattr(a, "q_bias"):  # Eva
        bias = None if a.q_bias is None else torch.cat((a.q_bias, a.k_bias, a.v_bias))
        qkv = torch.nn.functional.linear(y, a.qkv.weight, bias)
    else:
        qkv = a.qkv(y)
    q, k, _ = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    if getattr(t, "rope", None) is not None:
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat
        p = t.patch_embed.patch_size[0]
        rope = t.rope.get_embed(shape=[x.shape[-2] // p, x.shape[-1] // p])
        npt = t.num_prefix_tokens
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=True)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=True)], dim=2)
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3_qkvb"])
def test_intermediate_layers_and_attention_match_timm(name, tmp_path):
    kw, sizes = {**DINOV2, **DINOV3}[name]
    t = make_timm(name, **kw)
    m = dino_fast.load(save(t.state_dict(), tmp_path / "t.pth"), attention="sdpa")
    h, w = sizes[0]
    x = torch.randn(2, 3, h, w)
    p = m.num_prefix_tokens
    assert p == 5
    with torch.no_grad():
        want = t.forward_intermediates(x, indices=2, norm=True, output_fmt="NLC", intermediates_only=True,
                                       return_prefix_tokens=True)
        got = m.get_intermediate_layers(x, n=2)
        for (patches, prefix), ours in zip(want, got):
            assert rel_err(ours[:, p:], patches) < RTOL and rel_err(ours[:, :p], prefix) < RTOL
        attn = m.get_last_selfattention(x)
    assert rel_err(attn, _timm_last_attention(t, x)) < RTOL


def test_attention_maps_skip_registers(tmp_path):
    from dino_fast.eval.attention import attention_maps
    t = make_timm("vit_small_patch16_dinov3", **DINOV3["vit_small_patch16_dinov3"][0])
    m = dino_fast.load(save(t.state_dict(), tmp_path / "t.pth"), attention="sdpa")
    x = torch.randn(3, 48, 64)
    maps = attention_maps(m, x, 16, threshold=None)
    want = _timm_last_attention(t, x[None])[0, :, 0, 5:]          # CLS row over the 3 x 4 patches
    assert maps.attentions.shape == (6, 3, 4)
    assert rel_err(maps.attentions.reshape(6, -1), want) < RTOL


# ---------------------------------------------------------------- export round trips
@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2",
                                  "vit_small_patch16_dinov3_qkvb", "vit_7b_patch16_dinov3"])
def test_export_layouts_round_trip(name, tmp_path):
    kw, sizes = {**DINOV2, **DINOV3}[name]
    t = make_timm(name, **kw)
    src = save(t.state_dict(), tmp_path / "timm.pth")
    h, w = sizes[0]
    x = torch.randn(2, 3, h, w)
    want = timm_cls(t, x)
    family = "dinov3" if "dinov3" in name else "dinov2"
    # timm layout: strict into a fresh timm model of the same name
    export_checkpoint(src, str(tmp_path / "out_timm.pth"), "timm")
    t2 = timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw).eval()
    t2.load_state_dict(torch.load(tmp_path / "out_timm.pth"), strict=True)
    assert rel_err(timm_cls(t2, x), want) < 1e-6
    # the official layout of the family ("reference"), through timm's own converter of that layout
    export_checkpoint(src, str(tmp_path / "out_ref.pth"), "reference")
    official = torch.load(tmp_path / "out_ref.pth")
    assert ("storage_tokens" if family == "dinov3" else "mask_token") in official
    if family == "dinov3":
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    t3 = timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw).eval()
    t3.load_state_dict(checkpoint_filter_fn(official, t3), strict=True)
    assert rel_err(timm_cls(t3, x), want) < 1e-6
    # every layout back through dino_fast.load
    for fmt in ("timm", "reference", family, "safetensors"):
        out = tmp_path / f"back_{fmt}.{'safetensors' if fmt == 'safetensors' else 'pth'}"
        if fmt == "safetensors":
            pytest.importorskip("safetensors")
        export_checkpoint(src, str(out), fmt)
        with torch.no_grad():
            assert rel_err(dino_fast.load(str(out), attention="math")(x), want) < RTOL, fmt
    # a layout the model has no form in is refused with a clear error
    other = "dinov2" if family == "dinov3" else "dinov3"
    with pytest.raises(ValueError, match="RoPE|learned pos_embed"):
        export_checkpoint(src, str(tmp_path / "bad.pth"), other)


def test_dinov2_training_checkpoint_layouts(tmp_path):
    """DINOv2's teacher checkpoints: {"teacher": {"backbone.blocks.<chunk>.<i>.*", "dino_head.*",
    "ibot_head.*"}} with chunked blocks, and SSLMetaArch's flat "teacher.backbone.*" keys."""
    t = make_timm("vit_small_patch14_dinov2", img_size=56)
    official = timm_to_official_dinov2(t.state_dict())
    # block_chunks=2 over 2 blocks: chunk j holds block j, keys keep the global index
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda mm: f"blocks.{mm.group(1)}.{mm.group(1)}.", k): v
               for k, v in official.items()}
    assert "blocks.1.1.norm1.weight" in chunked
    teacher = {f"backbone.{k}": v for k, v in chunked.items()}
    teacher.update({"dino_head.mlp.0.weight": torch.zeros(8, 384), "ibot_head.mlp.0.weight": torch.zeros(8, 384)})
    x = torch.randn(2, 3, 56, 56)
    want = timm_cls(t, x)
    for i, obj in enumerate([{"teacher": teacher}, {"model": {f"teacher.{k}": v for k, v in teacher.items()}}]):
        torch.save(obj, tmp_path / f"ckpt{i}.pth")
        with torch.no_grad():
            assert rel_err(dino_fast.load(str(tmp_path / f"ckpt{i}.pth"))(x), want) < RTOL


def test_rope_periods_read_back():
    from dino_fast.model.backbone_config import rope_params
    for base in (100.0, 10000.0):
        hd = 64
        p = base ** (2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2))
        assert rope_params(p) == {"rope_base": base}
        assert rope_params(p.bfloat16())["rope_base"] == base        # DINOv3 stores them in bf16
    p = 2.0 * (50.0 ** torch.linspace(0, 1, 16))
    got = rope_params(p)
    assert got["rope_base"] is None and math.isclose(got["rope_min_period"], 2.0) and \
        math.isclose(got["rope_max_period"], 100.0, rel_tol=1e-5)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3_qkvb",
                                  "vit_small_plus_patch16_dinov3"])
def test_to_timm_builds_the_matching_timm_model(name, tmp_path):
    from dino_fast.model.timm_interop import timm_model_name, to_timm
    kw, sizes = {**DINOV2, **DINOV3}[name]
    t = make_timm(name, **kw)
    m = dino_fast.load(save(t.state_dict(), tmp_path / "t.pth"))
    assert timm_model_name(m) == name
    h, w = sizes[0]
    back = to_timm(m, img_size=h).eval()
    x = torch.randn(2, 3, h, w)
    assert rel_err(timm_cls(back, x), timm_cls(t, x)) < 1e-5
