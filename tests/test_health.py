"""Health statistics (reference, from materialised probabilities) and the collapse monitor."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_fast.kernels.dino_loss import STAT_NAMES
from dino_fast.runtime.health import CollapseMonitor, health_stats_reference


def _numpy_stats(student, teacher, center, ncrops, tt, ts, nt=2):
    """Float64 numpy version of the definitions (entropy, cross-entropy per pair, max prob)."""
    s = student.double().numpy() / ts
    t = (teacher.double().numpy() - center.double().numpy()) / tt

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(s), softmax(t)
    b = s.shape[0] // ncrops
    ent = lambda x: -(x * np.log(np.clip(x, 1e-300, None))).sum(-1)  # noqa: E731
    ce = []
    for i in range(nt):
        for v in range(ncrops):
            if v != i:
                qi, pv = q[i * b:(i + 1) * b], p[v * b:(v + 1) * b]
                ce.append((-(qi * np.log(pv)).sum(-1)).mean())
    return dict(teacher_entropy=ent(q).mean(), student_entropy=ent(p).mean(), cross_entropy=np.mean(ce),
                center_norm=np.sqrt((center.double().numpy() ** 2).sum()), teacher_max_prob=q.max(-1).mean())


@pytest.mark.parametrize("b, ncrops, k", [(1, 2, 7), (3, 4, 1000), (4, 6, 257)])
def test_reference_stats_match_plain_formulas(b, ncrops, k):
    student = torch.randn(ncrops * b, k)
    teacher = torch.randn(2 * b, k)
    center = 0.1 * torch.randn(1, k)
    got = health_stats_reference(student, teacher, center, ncrops, teacher_temp=0.04, student_temp=0.1)
    want = _numpy_stats(student, teacher, center, ncrops, 0.04, 0.1)
    assert set(got) == set(STAT_NAMES)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in got.values())
    for name in (n for n in STAT_NAMES if n != "kl"):            # kl is checked below
        assert got[name].item() == pytest.approx(want[name], rel=1e-4, abs=1e-5), name
    # the paper's decomposition: cross-entropy (the DINO loss) = teacher entropy + KL
    assert got["kl"].item() == pytest.approx(want["cross_entropy"] - want["teacher_entropy"], rel=1e-4, abs=1e-4)
    assert got["kl"].item() >= 0


def test_reference_stats_known_values():
    k, b, ncrops = 321, 2, 4
    flat = health_stats_reference(torch.zeros(ncrops * b, k), torch.zeros(2 * b, k), torch.zeros(1, k),
                                  ncrops, teacher_temp=0.04)
    assert flat["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert flat["student_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert flat["teacher_max_prob"].item() == pytest.approx(1 / k, rel=1e-5)
    assert abs(flat["kl"].item()) < 1e-5 and flat["center_norm"].item() == 0.0
    onehot = torch.zeros(2 * b, k)
    onehot[:, 5] = 10.0
    center = torch.zeros(1, k)
    center[0, 0], center[0, 1] = 3.0, 4.0
    sharp = health_stats_reference(torch.zeros(ncrops * b, k), onehot, center, ncrops, teacher_temp=0.04)
    assert sharp["teacher_entropy"].item() < 1e-6
    assert sharp["teacher_max_prob"].item() == pytest.approx(1.0, abs=1e-6)
    assert sharp["center_norm"].item() == pytest.approx(5.0)
    # KL(one-hot || uniform) = ln K
    assert sharp["kl"].item() == pytest.approx(math.log(k), rel=1e-5)


def test_reference_stats_bf16_inputs():
    b, ncrops, k = 4, 6, 999
    student, teacher, center = torch.randn(ncrops * b, k), torch.randn(2 * b, k), 0.1 * torch.randn(1, k)
    ref = health_stats_reference(student, teacher, center, ncrops, 0.04)
    low = health_stats_reference(student.bfloat16(), teacher.bfloat16(), center, ncrops, 0.04)
    # bf16 logits (8 mantissa bits) divided by tau_t = 0.04: errors up to ~0.4 % of the logit scale
    for name in STAT_NAMES:
        assert low[name].dtype == torch.float32
        assert low[name].item() == pytest.approx(ref[name].item(), rel=0.03, abs=0.02), name


def test_reference_stats_shape_errors():
    with pytest.raises(ValueError, match="same batch size"):
        health_stats_reference(torch.zeros(12, 5), torch.zeros(8, 5), torch.zeros(1, 5), ncrops=4, teacher_temp=0.04)


# ----------------------------------------------------------------------------- monitor
K = 1000


def _stats(teacher_logits: torch.Tensor, ncrops: int = 4) -> dict[str, float]:
    b = teacher_logits.shape[0] // 2
    student = torch.randn(ncrops * b, K)
    out = health_stats_reference(student, teacher_logits, torch.zeros(1, K), ncrops, teacher_temp=0.04)
    return {k: v.item() for k, v in out.items()}


def _uniform():
    return _stats(torch.full((8, K), 0.3))


def _onehot():
    t = torch.zeros(8, K)
    t[:, 17] = 1.0          # same dimension for every image: one dimension dominates
    return _stats(t)


def _healthy():
    return _stats(0.1 * torch.randn(8, K))   # tau_t = 0.04 -> logit std 2.5: entropy ~ 0.55 ln K


CTX = dict(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, center_momentum=0.9,
           lr=0.00123, base_lr=0.0005, batch_size=1024, batch_size_per_gpu=64, world_size=16,
           momentum_teacher=0.996, norm_last_layer=True, grad_accum_steps=2, step=4321, checkpoint="/runs/a/checkpoint.pth")


def test_healthy_teacher_never_warns():
    h = _healthy()
    assert 0.05 * math.log(K) < h["teacher_entropy"] < 0.99 * math.log(K)
    mon = CollapseMonitor(K, patience=3)
    assert all(mon.update(_healthy(), epoch=e, context=CTX) is None for e in range(20))
    assert not mon.collapsed and mon.mode is None


@pytest.mark.parametrize("make, mode, words", [
    (_uniform, "uniform", ["UNIFORM collapse", "lower --teacher_temp (now 0.07", "sharpening is too weak"]),
    (_onehot, "one-dimension", ["ONE-DIMENSION collapse", "centre momentum m", "now 0.9",
                                "--teacher_temp is already 0.07", "mean max probability 1.000", "--norm_last_layer true (now true)"]),
])
def test_collapse_warning_fires_after_patience(make, mode, words):
    mon = CollapseMonitor(K, patience=3, warmup_teacher_temp_epochs=2)
    stats = make()
    # during the teacher-temperature warm-up: no verdict, however collapsed
    assert all(mon.update(stats, epoch=e, context=CTX) is None for e in (0, 0, 1, 1, 1))
    assert mon.update(stats, 2, CTX) is None and mon.update(stats, 2, CTX) is None
    assert not mon.collapsed
    msg = mon.update(stats, 3, CTX)
    assert msg is not None and mon.collapsed and mon.mode == mode
    for w in words + ["Section 5.3", f"ln(K) = {math.log(K):.3f}", "for 3 consecutive", "epoch 3, step 4321",
                      "--lr", "0.0005", "0.00123", "1024 in total", "64 per GPU", "16 ranks; 2 micro-batch(es) per step",
                      "--momentum_teacher (now 0.996", "Last checkpoint: /runs/a/checkpoint.pth"]:
        assert w in msg, (w, msg)
    assert f"teacher entropy {stats['teacher_entropy']:.3f}" in msg
    assert "KL(teacher || student)" in msg
    # once per episode; stays collapsed
    assert mon.update(stats, 3, CTX) is None and mon.collapsed


def test_patience_counts_consecutive_steps_only():
    mon = CollapseMonitor(K, patience=3)
    u, h = _uniform(), _healthy()
    assert [mon.update(s, 0) for s in (u, u, h, u, u)] == [None] * 5
    assert mon.update(u, 0) is not None                      # third in a row after the reset
    assert mon.update(h, 0) is None and not mon.collapsed    # recovery clears the flag
    # a switch of mode restarts the count
    o = _onehot()
    assert [mon.update(s, 0) for s in (u, u, o, o)] == [None] * 4
    msg = mon.update(o, 0)
    assert msg is not None and "ONE-DIMENSION" in msg and "?" in msg   # no context: unknown values shown as ?
    assert "raise --teacher_temp (now ?)" in msg


def test_thresholds_and_non_finite():
    mon = CollapseMonitor(65536, patience=1)
    ln_k = math.log(65536)
    assert mon.classify(0.995 * ln_k) == "uniform" and mon.classify(11.09) == "uniform"
    assert mon.classify(0.985 * ln_k) is None
    assert mon.classify(0.049 * ln_k) == "one-dimension" and mon.classify(0.051 * ln_k) is None
    assert mon.classify(float("nan")) is None
    assert mon.update({"teacher_entropy": float("nan")}, 5) is None and mon.count == 0
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(K, patience=0)
    with pytest.raises(ValueError, match="out_dim"):
        CollapseMonitor(1)
