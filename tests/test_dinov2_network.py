"""The dinov2 networks and objective: the global crops' masked patches are the
mask token (their pixels reach no output), the heads run on exactly the CLS
rows and the masked patch rows (no padding), and the objective equals a plain
float64 formula of DINOv2's loss (pairs, weights, KoLeo, iBOT weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dino_fast.dinov2.masking import sample_masks, step_rng
from dino_fast.dinov2.network import build_dinov2_network
from dino_fast.dinov2.objective import DINOv2Objective
from dino_fast.train.presets import resolve

CFG = dict(method="dinov2", patch_size=4, depth=2, out_dim=37, head_hidden_dim=16, head_bottleneck_dim=8,
           global_size=16, local_size=8, local_crops_number=3, batch_size_per_gpu=5, device="cpu",
           drop_path_rate=0.0, ibot_out_dim=29, ibot_head_hidden_dim=16, ibot_head_bottleneck_dim=8,
           loss_impl="torch")


def _setup(separate: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = resolve(None, {**CFG, "ibot_separate_head": separate})
    net = build_dinov2_network(cfg, student=True)
    with torch.no_grad():
        net.backbone.mask_token.normal_()          # a non-zero token, so substitution shows
    B = cfg.batch_size_per_gpu
    crops = [torch.randn(B, 3, 16, 16) for _ in range(2)] + [torch.randn(B, 3, 8, 8) for _ in range(3)]
    mb = sample_masks(2 * B, (4, 4), (0.1, 0.5), 0.5, rng=step_rng(0, seed, 0))
    return cfg, net, crops, mb, B


def _masks(mb, B, n):
    return [mb.masks[:B], mb.masks[B:]] + [None] * (n - 2)


def test_masked_pixels_reach_no_output_and_unmasked_do():
    cfg, net, crops, mb, B = _setup(separate=True)
    net.eval()
    out = net(crops, masks=_masks(mb, B, 5), mask_indices=mb.indices)
    pix = mb.masks.view(2 * B, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)   # (2B, 16, 16)
    g = torch.cat(crops[:2])
    noisy = torch.where(pix[:, None], g + 5 * torch.randn_like(g), g)                 # change masked pixels only
    out2 = net(list(noisy.chunk(2)) + crops[2:], masks=_masks(mb, B, 5), mask_indices=mb.indices)
    for k in ("global_logits", "local_logits", "patch_logits", "global_patches"):
        torch.testing.assert_close(out2[k], out[k], rtol=0, atol=0)
    g3 = torch.where(pix[:, None], g, g + torch.randn_like(g))                          # unmasked pixels
    out3 = net(list(g3.chunk(2)) + crops[2:], masks=_masks(mb, B, 5), mask_indices=mb.indices)
    assert not torch.allclose(out3["global_logits"], out["global_logits"])


def test_mask_token_replaces_the_patch_embedding_depth0():
    """Without blocks the masked outputs are norm(mask_token + pos_embed) (a plain formula)."""
    cfg, _, crops, mb, B = _setup(separate=False)
    cfg = resolve(None, {**CFG, "depth": 1})
    net = build_dinov2_network(cfg, student=True).eval()
    net.backbone.blocks = torch.nn.ModuleList()                # depth 0
    with torch.no_grad():
        net.backbone.mask_token.normal_()
    out = net(crops[:2], masks=_masks(mb, B, 2), mask_indices=mb.indices)
    bb = net.backbone
    pos = bb.interpolate_pos_encoding(torch.zeros(1, 17, bb.embed_dim), 16, 16)[0, 1:]   # (16, D) at 16 px
    tok = torch.where(mb.masks[..., None], bb.mask_token[None], bb.patch_embed(torch.cat(crops[:2])))  # (2B, 16, D)
    ref = F.layer_norm(tok + pos, (bb.embed_dim,), bb.norm.weight, bb.norm.bias, bb.norm.eps)
    torch.testing.assert_close(out["global_patches"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("separate", [False, True])
def test_heads_run_on_the_masked_tokens_only(separate):
    cfg, net, crops, mb, B = _setup(separate)
    rows = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: rows.setdefault(k, []).append(i[0].shape[0]))
             for k, m in (("head", net.head), ("ibot", net.ibot_head)) if m is not None]
    out = net(crops, masks=_masks(mb, B, 5), mask_indices=mb.indices)
    for h in hooks:
        h.remove()
    n_cls, n = 5 * B, int(mb.masks.sum())
    assert out["patch_logits"].shape[0] == n == mb.n_masked
    if separate:
        assert rows == {"head": [n_cls], "ibot": [n]}
        head = net.ibot_head
    else:
        assert rows == {"head": [n_cls + n]}                  # one pass: CLS rows + masked rows, no padding
        head = net.head
    ref = head(out["global_patches"][mb.masks])              # boolean selection: the reference gather
    torch.testing.assert_close(out["patch_logits"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["global_logits"], net.head(net.backbone.forward_features(crops[:2] + crops[2:],
                               _masks(mb, B, 5))[0]["x_norm_clstoken"]), rtol=1e-5, atol=1e-5)


def _ce(q, s, tau=0.1):
    return -(q * F.log_softmax(s / tau, dim=-1)).sum(-1)      # (rows,)


def _koleo(x):
    x = F.normalize(x, dim=-1)
    d = x @ x.T
    d.fill_diagonal_(-1)
    nn = d.argmax(1)
    return -torch.log((x - x[nn] + 1e-8).norm(dim=-1) + 1e-8).mean()


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_objective_equals_dinov2_formula_in_float64(centering):
    torch.manual_seed(1)
    cfg = resolve(None, {**CFG, "centering": centering, "koleo_loss_weight": 0.3, "ibot_loss_weight": 0.7,
                         "dino_loss_weight": 1.3, "ibot_separate_head": True})
    obj = DINOv2Objective(cfg, impl="torch")
    B, nl, K, Ki, D = 5, 3, 37, 29, 12
    mb = sample_masks(2 * B, (4, 4), (0.1, 0.5), 0.5, rng=step_rng(0, 3, 0))
    n = mb.n_masked
    t_cls, t_patch = torch.randn(2 * B, K) * 3, torch.randn(n, Ki) * 3
    s = {"global_logits": torch.randn(2 * B, K, requires_grad=True),
         "local_logits": torch.randn(nl * B, K, requires_grad=True),
         "patch_logits": torch.randn(n, Ki, requires_grad=True),
         "global_cls": torch.randn(2 * B, D, requires_grad=True)}
    temp = 0.05
    loss = obj(s, obj.teacher_dino(t_cls, temp), obj.teacher_ibot(t_patch, temp), mb, 2 * B)
    grads = torch.autograd.grad(loss, list(s.values()))
    t_cls, t_patch = t_cls.double(), t_patch.double()
    s = {k: v.detach().double().requires_grad_() for k, v in s.items()}

    def teacher(t):                                           # first step: centre 0; or DINOv2's Sinkhorn-Knopp
        if centering == "softmax":
            return F.softmax(t / temp, -1)
        Q = torch.exp(t / temp).T
        Q /= Q.sum()
        Kp, Bp = Q.shape
        for _ in range(3):
            Q /= Q.sum(1, keepdim=True)
            Q /= Kp
            Q /= Q.sum(0, keepdim=True)
            Q /= Bp
        return (Q * Bp).T
    q = teacher(t_cls).view(2, B, K)
    qi = teacher(t_patch)
    g, loc = s["global_logits"].view(2, B, K), s["local_logits"].view(nl, B, K)
    n_terms = 2 * nl + 2
    dino = sum(_ce(q[i], loc[v]).mean() for i in range(2) for v in range(nl)) / n_terms \
        + (_ce(q[0], g[1]).mean() + _ce(q[1], g[0]).mean()) / n_terms
    koleo = _koleo(s["global_cls"][:B]) + _koleo(s["global_cls"][B:])
    w = 1.0 / mb.masks.sum(1).clamp(min=1).double()[mb.indices // 16]
    ibot = (w * _ce(qi, s["patch_logits"])).sum() / (2 * B)
    ref = 1.3 * dino + 0.3 * koleo + 0.7 * ibot
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for k, v in (("ibot", ibot), ("koleo", koleo / 2)):
        torch.testing.assert_close(obj.last_stats[k].double(), v.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(obj.last_stats["dino_local"].double() + obj.last_stats["dino_global"].double(),
                               dino.detach(), rtol=1e-6, atol=1e-6)
    grads_ref = torch.autograd.grad(ref, list(s.values()))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    for k in ("teacher_entropy", "ibot_teacher_entropy", "student_entropy", "ibot_student_entropy"):
        assert torch.isfinite(obj.last_stats[k]), k
