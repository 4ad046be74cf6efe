"""The DINOv2 / DINOv3 ViT options on the packed multi-crop path: packed == per-crop (and ==
timm per crop) with registers and RoPE on several backends, forward_features and masks, the
untied local CLS norm, RoPE coordinate augmentations, the masked k bias, parameter names,
parameter counts against timm and the published figures, FLOPs against FlopCounterMode."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dino_fast.model as dm
from dino_fast.model.flops import vit_forward_flops

timm = pytest.importorskip("timm")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or ("norm" in name and name.endswith("weight")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(("cls_token", "reg_token", "pos_embed", "register_tokens", "mask_token")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _pair(name, **kw):
    """A random timm model and dino-fast's copy of it (via the timm layout)."""
    from dino_fast.model.backbone_config import infer_from_state_dict
    from dino_fast.model.formats import to_internal
    torch.manual_seed(0)
    t = _randomize(timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kw))
    sd, hints = to_internal(t.state_dict())
    cfg = infer_from_state_dict(sd, hints)
    m = cfg.build(attention="math")
    if m.rope_embed is not None:  # timm's Eva saves no RoPE buffer
        sd["rope_embed.periods"] = m.rope_embed.periods.clone()
    m.load_state_dict(sd, strict=True)
    return t, m.eval()


def _crops(sizes, b=2):
    torch.manual_seed(1)
    return [torch.randn(b, 3, h, w) for h, w in sizes]


MULTICROP = [(48, 48), (48, 48), (32, 32), (32, 32), (32, 32)]  # 2 globals + 3 locals


@pytest.mark.parametrize("name,kw", [("vit_small_patch16_dinov3_qkvb", {}),
                                     ("vit_small_patch14_reg4_dinov2", dict(img_size=42, dynamic_img_size=True))])
@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_packed_multicrop_equals_per_crop_and_timm(name, kw, backend):
    """Registers in every row, RoPE on each crop's own grid: the packed forward of all crops
    equals our per-crop forward and timm's per-crop forward_features(x)[:, 0]."""
    t, m = _pair(name, **kw)
    m.set_attention(backend)
    sizes = MULTICROP if "patch16" in name else [(42, 42), (42, 42), (28, 28), (28, 28), (28, 28)]
    crops = _crops(sizes)
    with torch.no_grad():
        packed = m(crops)                                        # (5 * 2, D), crop-major
        per_crop = torch.cat([m(c) for c in crops])
        want = torch.cat([t.forward_features(c)[:, 0] for c in crops])
    assert packed.shape == (10, t.embed_dim)
    assert rel_err(packed, per_crop) < 1e-5
    assert rel_err(packed, want) < 1e-4


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_gradients_equal_per_crop(backend):
    _, m = _pair("vit_small_patch16_dinov3_qkvb")
    m.set_attention(backend)
    crops = _crops(MULTICROP)
    g = torch.randn(10, 384)
    (m(crops) * g).sum().backward()
    packed = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    (torch.cat([m(c) for c in crops]) * g).sum().backward()
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert rel_err(packed[n], p.grad) < 1e-4, n


def test_forward_features_dicts_and_masks():
    _, m = _pair("vit_small_patch16_dinov3")
    m.mask_token = torch.nn.Parameter(m.patch_embed.proj.bias.detach()[None].clone())  # (1, D)
    crops = _crops(MULTICROP)
    with torch.no_grad():
        outs = m.forward_features(crops)
        cls = m(crops)
    assert len(outs) == 2                                         # one dict per resolution group
    g, loc = outs
    assert g["x_norm_clstoken"].shape == (4, 384) and loc["x_norm_clstoken"].shape == (6, 384)
    assert g["x_norm_regtokens"].shape == (4, 4, 384) and g["x_norm_patchtokens"].shape == (4, 9, 384)
    assert loc["x_norm_patchtokens"].shape == (6, 4, 384) and g["x_prenorm"].shape == (4, 14, 384)
    assert torch.equal(torch.cat([g["x_norm_clstoken"], loc["x_norm_clstoken"]]), cls)
    ln = F.layer_norm(g["x_prenorm"], (384,), m.norm.weight, m.norm.bias, m.norm.eps)
    assert torch.allclose(ln[:, 5:], g["x_norm_patchtokens"], atol=1e-6)
    # masks: with mask_token = the patch embedding of an all-zero patch (its conv bias), masking
    # patches is the same as zeroing their pixels (DINOv2's prepare_tokens_with_masks)
    torch.manual_seed(3)
    masks = [torch.rand(2, 9) < 0.5, torch.rand(2, 9) < 0.5] + [None] * 3
    zeroed = [c.clone() for c in crops]
    for c, mk in zip(zeroed, masks):
        if mk is not None:
            grid = mk.view(2, 3, 3).repeat_interleave(16, 1).repeat_interleave(16, 2)  # (2, 48, 48)
            c[grid[:, None].expand_as(c)] = 0
    with torch.no_grad():
        got = m.forward_features(crops, masks)
        want = m.forward_features(zeroed)
    assert torch.equal(got[0]["masks"], torch.cat(masks[:2])) and got[1]["masks"] is None
    for a, b in zip(got, want):
        assert rel_err(a["x_norm_patchtokens"], b["x_norm_patchtokens"]) < 1e-5
        assert rel_err(a["x_norm_clstoken"], b["x_norm_clstoken"]) < 1e-5
    # a single batch -> a single dict, as DINOv2's forward_features
    with torch.no_grad():
        one = m.forward_features(crops[0], masks[0])
    assert isinstance(one, dict) and rel_err(one["x_norm_patchtokens"], got[0]["x_norm_patchtokens"][:2]) < 1e-5
    with pytest.raises(ValueError, match="mask token"):
        dm.vit_tiny(patch_size=16, depth=1).forward_features(crops[0], masks[0])


def test_untied_local_cls_norm_in_train_mode_only():
    torch.manual_seed(0)
    m = dm.vit_tiny(patch_size=8, depth=2, num_register_tokens=2, untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        m.local_cls_norm.weight.uniform_(0.5, 1.5)
        m.local_cls_norm.bias.normal_()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    m.train()
    with torch.no_grad():
        outs = m.forward_features(crops)
        cls = m(crops)
    g, loc = outs
    want_g = F.layer_norm(g["x_prenorm"][:, 0], (192,), m.norm.weight, m.norm.bias, 1e-6)
    want_l = F.layer_norm(loc["x_prenorm"][:, :3], (192,), m.local_cls_norm.weight, m.local_cls_norm.bias, 1e-6)
    assert torch.allclose(g["x_norm_clstoken"], want_g, atol=1e-5)
    assert torch.allclose(loc["x_norm_clstoken"], want_l[:, 0], atol=1e-5)
    assert torch.allclose(loc["x_norm_regtokens"], want_l[:, 1:], atol=1e-5)
    assert torch.allclose(cls, torch.cat([want_g, want_l[:, 0]]), atol=1e-5)
    m.eval()
    with torch.no_grad():
        loc = m.forward_features(crops)[1]
    want = F.layer_norm(loc["x_prenorm"][:, 0], (192,), m.norm.weight, m.norm.bias, 1e-6)
    assert torch.allclose(loc["x_norm_clstoken"], want, atol=1e-5)
    assert "local_cls_norm.weight" in m.state_dict()


def test_rope_coordinates_and_augmentations():
    from dino_fast.model.rope import RopePositionEmbedding
    r = RopePositionEmbedding(384, 6)
    c = r.coords(3, 4, "cpu")                                     # DINOv3: 2 * (i + 0.5) / n - 1
    ii, jj = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    want = torch.stack([2 * (ii + 0.5) / 3 - 1, 2 * (jj + 0.5) / 4 - 1], -1).reshape(-1, 2)
    assert torch.allclose(c, want)
    assert torch.allclose(RopePositionEmbedding(384, 6, normalize_coords="max").coords(3, 4, "cpu")[:, 0],
                          2 * (ii.flatten() + 0.5) / 4 - 1)
    for kind, value in [("shift", 0.3), ("jitter", 2.0), ("rescale", 2.0)]:
        aug = RopePositionEmbedding(384, 6, **{f"{kind}_coords": value}).train()
        ca = aug.coords(3, 4, "cpu")
        keep = want[:, 0] != 0                                     # the middle row sits at 0
        ca, want_k = ca[keep], want[keep]
        if kind == "shift":
            d = ca - want_k                                        # one offset per axis, |offset| <= s
            assert torch.allclose(d, d[:1].expand_as(d)) and d.abs().max() <= 0.3
        else:
            s = ca / want_k                                        # one factor per axis in [1/x, x]
            assert torch.allclose(s, s[:1].expand_as(s), atol=1e-5)
            assert (s >= 0.5 - 1e-6).all() and (s <= 2 + 1e-6).all()
            if kind == "rescale":
                assert torch.allclose(s[0, 0], s[0, 1])
        assert torch.equal(aug.eval().coords(3, 4, "cpu"), want)   # no augmentation in eval mode
    # periods: base^(2k / (hd/2)), hd = 64
    assert torch.allclose(r.periods, 100.0 ** (torch.arange(16.0) / 16))


def test_rope_augmentation_on_the_student_only():
    from dino_fast.train.build import build_backbone
    from dino_fast.train.presets import resolve
    cfg = resolve("demo", dict(pos_embed="rope", num_register_tokens=4, rope_rescale_coords=2.0, depth=1))
    student, teacher = build_backbone(cfg, True), build_backbone(cfg, False)
    teacher.load_state_dict(student.state_dict())
    assert student.rope_embed.rescale_coords == 2.0 and teacher.rope_embed.rescale_coords is None
    x = torch.randn(2, 3, 28, 28)
    student.train()
    teacher.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = student(x)
        b = student(x)
        assert not torch.allclose(a, b)                            # a fresh draw per forward
        assert torch.equal(teacher(x), teacher(x))
        assert torch.allclose(student.eval()(x), teacher(x), atol=1e-6)


def test_masked_k_bias_has_no_effect():
    torch.manual_seed(0)
    m = dm.vit_tiny(patch_size=8, depth=2, pos_embed="rope", mask_k_bias=True).eval()
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.bias.normal_()
        a = m(x)
        for blk in m.blocks:
            blk.attn.qkv.bias[192:384] = 0.0
        b = m(x)
        m.blocks[0].attn.mask_k_bias = False
        m.blocks[0].attn.qkv.bias[192:384] = 1.0
        c = m(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_parameter_names_follow_the_official_layouts():
    with torch.device("meta"):
        ref = dm.vit_small(depth=1).state_dict()
        v2 = dm.vit_giant2(patch_size=14, depth=1, num_register_tokens=4, layerscale_init=1e-5,
                           mask_token=True).state_dict()
        v3 = dm.vit_small(depth=1, pos_embed="rope", num_register_tokens=4, layerscale_init=1e-5,
                          ffn_layer="swiglu", untie_global_and_local_cls_norm=True).state_dict()
    assert {"register_tokens", "mask_token", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "blocks.0.mlp.w12.weight",
            "blocks.0.mlp.w3.weight"} <= set(v2)
    assert v2["blocks.0.mlp.w12.weight"].shape == (8192, 1536)     # DINOv2 ViT-g: hidden 4096
    assert "pos_embed" not in v3 and {"rope_embed.periods", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight",
                                      "local_cls_norm.weight"} <= set(v3)
    assert not any(k.startswith(("register", "mask", "rope", "local")) or ".ls" in k for k in ref)


def test_ffn_hidden_widths_follow_dinov2_and_dinov3():
    from dino_fast.model.ffn import ffn_hidden_dim
    assert ffn_hidden_dim("swiglufused", 1536, 4.0) == 4096       # (int(6144 * 2/3) + 7) // 8 * 8
    assert ffn_hidden_dim("swiglu64", 4096, 3.0) == 8192          # DINOv3 7B
    assert ffn_hidden_dim("swiglu", 384, 6.0) == 1536             # DINOv3 ViT-S+ (timm: 1536)
    assert ffn_hidden_dim("swiglu32", 1000, 4.0) == 2688          # int(2666.67) = 2666 -> 2688
    assert ffn_hidden_dim("mlp", 1152, 3.777777778) == 4352


@pytest.mark.parametrize("ours,kw,timm_name,published", [
    # DINOv2 model card / README: ViT-L/14 300 M (304 M), ViT-g/14 1,100 M (1.1 B); at 518 px (37 x 37 grid)
    ("vit_large", dict(patch_size=14, img_size=518, layerscale_init=1e-5), "vit_large_patch14_dinov2", (304, 1e6)),
    ("vit_giant2", dict(patch_size=14, img_size=518, layerscale_init=1e-5), "vit_giant_patch14_dinov2", (1.1, 1e9)),
    # DINOv3 README: ViT-7B/16 6,716 M
    ("vit_7b", dict(patch_size=16, num_register_tokens=4, layerscale_init=1e-5, pos_embed="rope", qkv_bias=False,
                    norm_eps=1e-5), "vit_7b_patch16_dinov3", (6716, 1e6)),
])
def test_parameter_counts_equal_timm_and_published(ours, kw, timm_name, published):
    with torch.device("meta"):
        m = getattr(dm, ours)(**kw)
        t = timm.create_model(timm_name, pretrained=False, num_classes=0)
    n = sum(p.numel() for p in m.parameters())
    assert n == sum(p.numel() for p in t.parameters())
    value, unit = published
    assert round(n / unit, 1 if unit == 1e9 else 0) == value


@pytest.mark.parametrize("kw", [dict(num_register_tokens=4, layerscale_init=1e-5),
                                dict(ffn_layer="swiglufused"),
                                dict(pos_embed="rope", num_register_tokens=4, ffn_layer="swiglu64")])
def test_flops_of_new_features_match_flop_counter(kw):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = dm.vit_base(patch_size=16, attention="math", **kw)
    for size in (224, (96, 160)):
        h, w = (size, size) if isinstance(size, int) else size
        with FlopCounterMode(display=False) as fc:
            m(torch.empty(1, 3, h, w, device="meta"))
        assert abs(vit_forward_flops(m, size) - fc.get_total_flops()) / fc.get_total_flops() < 0.002


def test_convnet_flops_counted_on_meta():
    from dino_fast.model.convnet import build_convnet
    r = build_convnet("resnet50")
    assert vit_forward_flops(r, 224) / 1e9 == pytest.approx(8.18, rel=0.01)   # 4.09 GMACs (torchvision)


def test_activation_checkpointing_with_rope_augmentation_same_gradients():
    torch.manual_seed(0)
    m = dm.vit_tiny(patch_size=8, depth=2, pos_embed="rope", num_register_tokens=2, layerscale_init=0.5,
                    rope_rescale_coords=2.0, rope_jitter_coords=1.5, drop_path_rate=0.2).train()
    mc = copy.deepcopy(m)
    mc.use_checkpoint = True
    crops = [torch.randn(2, 3, 24, 24), torch.randn(2, 3, 16, 16)]
    torch.manual_seed(5)
    m(crops).square().sum().backward()
    torch.manual_seed(5)
    mc(crops).square().sum().backward()
    for (n, p), q in zip(m.named_parameters(), mc.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


def _fsdp2_worker(rank, world_size, out_path):
    """FSDP2 (bf16 parameters) over a RoPE + registers ViT and a ResNet through build.shard's units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dino_fast.model.convnet import fsdp_units
    torch.manual_seed(0)
    model = dm.vit_tiny(patch_size=8, depth=2, attention="sdpa", pos_embed="rope", num_register_tokens=4,
                        layerscale_init=0.5)
    want_model = copy.deepcopy(model).eval()
    dtypes = []
    model.blocks[0].attn.register_forward_pre_hook(lambda mod, args: dtypes.append(args[3].cos.dtype))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in fsdp_units(model):
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 24, 24), torch.randn(2, 3, 24, 24), torch.randn(2, 3, 16, 16)]
    out = model.eval()(crops).float()
    out.sum().backward()
    conv = dm.build_backbone("resnet18")
    conv_want = copy.deepcopy(conv)
    for unit in fsdp_units(conv):
        fully_shard(unit)
    fully_shard(conv)
    x = torch.randn(2, 3, 32, 32)
    conv_out = conv(x)
    conv_out.sum().backward()
    if rank == 0:
        torch.save({"out": out.detach(), "want": want_model(crops).detach(), "dtypes": dtypes,
                    "conv": conv_out.detach(), "conv_want": conv_want(x).detach()}, out_path)


def test_fsdp2_rope_registers_and_convnet(tmp_path):
    from tests._dist import run_distributed
    path = str(tmp_path / "fsdp.pt")
    run_distributed(_fsdp2_worker, path, world_size=2)
    res = torch.load(path)
    assert res["dtypes"] == [torch.float32]       # the RoPE tables are not cast to bf16 by FSDP2
    assert res["out"].shape == (6, 192) and rel_err(res["out"], res["want"]) < 3e-2
    assert rel_err(res["conv"], res["conv_want"]) < 1e-5
