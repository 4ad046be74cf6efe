"""Evaluation bench: k-NN search and feature extraction vs the reference's
approach, timed in the same run.

k-NN search (GPU): 100k train x 100k test L2-normalised features, D = 384 and
768, 1000 classes, k in 10 20 100 200, T = 0.07. Ours: one blocked search for
the largest k (similarity blocks of <= 512 MiB, running top-k merge), every k
voted from that list. Reference (eval_knn.py `knn_classifier`, imported from
dino_fast.eval.knn and used by the tests too): per k, 100 chunks of 1000 test
rows each multiplied with the whole train matrix, top-k, a
(1000 * k, 1000) one-hot vote. FLOPs counted: the similarity GEMM, 2 N M D
(the reference does it once per k). Smoke (CPU): small N, identical
predictions to the brute-force reference of tests/test_knn.py asserted.

Feature extraction (GPU): images/s of the teacher CLS features, ViT-S/16 and
ViT-B/16 and ViT-B/8 at 224 px, batch 256 of images already on the GPU (the
model cost only; decoding is the pipelines' bench): ours (bf16 autocast, the
model's fused attention backend) vs the reference's fp32 forward (explicit
softmax attention). MFU from dino_fast.model.flops.
On a GPU each record goes to bench/results/eval_<device>.json.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dino_fast.benchmark.baseline import save_record
from dino_fast.benchmark import peak_extra_memory, record, time_ms
from dino_fast.eval.features import extract_features
from dino_fast.eval.knn import knn_classifier_reference, knn_evaluate, knn_predict
from tests.test_knn import brute_force_accuracy, brute_force_ranks

KS = (10, 20, 100, 200)
T = 0.07




def _clustered(n: int, d: int, c: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features around c random centres (shared by train and test)."""
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(99)).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g, device=device)
    x = centers[y] + 1.2 * torch.randn(n, d, generator=g, device=device)
    return F.normalize(x, dim=1), y


@pytest.mark.parametrize("dim", [384, 768])
def test_knn_search(benchmark, device, smoke, spec, dim):
    if smoke and dim != 384:
        pytest.skip("smoke mode runs one small case (correctness only)")
    n, m, c = (3000, 700, 23) if smoke else (100_000, 100_000, 1000)
    d = 48 if smoke else dim
    train_f, train_y = _clustered(n, d, c, 0, device)
    test_f, test_y = _clustered(m, d, c, 1, device)

    ours = knn_evaluate(train_f, train_y, test_f, test_y, KS, T, c)
    ref = {k: knn_classifier_reference(train_f, train_y, test_f, test_y, k, T, c) for k in KS}
    # correctness: the reference loop's numbers; on the CPU also identical predictions to brute force
    for k in KS:
        tol = 1e-9 if smoke else 0.01  # GPU: a GEMM of another shape may flip an exact near-tie (1 in 10^4)
        assert ours[k] == pytest.approx(ref[k], abs=tol), (k, ours[k], ref[k])
    if smoke:
        for k in KS:
            ranks = knn_predict(train_f, train_y, test_f, k, T, c, test_chunk=97, train_chunk=311)
            expect = brute_force_ranks(train_f, train_y, test_f, k, T, c)
            assert torch.equal(ranks[:, :5], expect[:, :5])
            assert ours[k] == pytest.approx(brute_force_accuracy(expect, test_y, k), abs=1e-9)
    else:  # predictions of a slice against the fp64 brute force
        sl = slice(0, 2000)
        got = knn_predict(train_f, train_y, test_f[sl], 20, T, c)[:, 0]
        want = brute_force_ranks(train_f, train_y, test_f[sl], 20, T, c)[:, 0]
        assert (got == want).float().mean().item() >= 0.999

    iters = 1 if smoke else 3
    ms = time_ms(lambda: knn_evaluate(train_f, train_y, test_f, test_y, KS, T, c), 1, iters)
    ref_ms = time_ms(lambda: [knn_classifier_reference(train_f, train_y, test_f, test_y, k, T, c) for k in KS],
                     1 if not smoke else 0, iters)
    ms20 = time_ms(lambda: knn_evaluate(train_f, train_y, test_f, test_y, (20,), T, c), 1, iters)
    ref20 = time_ms(lambda: knn_classifier_reference(train_f, train_y, test_f, test_y, 20, T, c), 1, iters)
    rec = record(ms, spec, flops=2.0 * n * m * d, ref_ms=ref_ms,
                 peak_mem=peak_extra_memory(lambda: knn_evaluate(train_f, train_y, test_f, test_y, KS, T, c)),
                 op="knn_search", variant=f"n{n}_m{m}_d{d}_c{c}", ks=list(KS), smoke=smoke, gemm_dtype="fp32",
                 ref_peak_mem_bytes=peak_extra_memory(
                     lambda: [knn_classifier_reference(train_f, train_y, test_f, test_y, k, T, c) for k in KS]),
                 k20_ms=ms20, k20_ref_ms=ref20, k20_speedup=ref20 / ms20,
                 top1={str(k): ours[k][0] for k in KS})
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(lambda: knn_evaluate(train_f, train_y, test_f, test_y, KS, T, c),
                       rounds=1, iterations=1, warmup_rounds=0)
    if not smoke:
        save_record("eval", f"{rec['op']}/{rec['variant']}", rec)


EXTRACT_CASES = [("vit_small", 16), ("vit_base", 16), ("vit_base", 8)]


@pytest.mark.parametrize("arch,patch", EXTRACT_CASES, ids=[f"{a}{p}" for a, p in EXTRACT_CASES])
def test_feature_extraction(benchmark, device, smoke, spec, arch, patch):
    import dino_fast.model as models
    from dino_fast.model.flops import vit_forward_flops

    if smoke:
        if (arch, patch) != EXTRACT_CASES[0]:
            pytest.skip("smoke mode runs one tiny case (correctness only)")
        size, batch, n = 32, 16, 48
        kw = dict(depth=2)
        arch, patch = "vit_tiny", 8
    else:
        size, batch, n = 224, 256, 2048
        kw = {}
    torch.manual_seed(0)
    fast = getattr(models, arch)(patch_size=patch, attention="auto", **kw).to(device).eval()
    slow = getattr(models, arch)(patch_size=patch, attention="math", **kw).to(device).eval()
    slow.load_state_dict(fast.state_dict())
    images = torch.randn(n, 3, size, size, device=device)
    batches = [(images[i:i + batch], None) for i in range(0, n, batch)]

    ours = extract_features(fast, batches, device)                      # bf16 autocast on a GPU
    ref = extract_features(slow, batches, device, amp=False)           # the reference: fp32
    with torch.no_grad():
        manual = F.normalize(torch.cat([slow(x) for x, _ in batches]).float(), dim=1)
    torch.testing.assert_close(ref, manual, rtol=1e-4, atol=1e-5)
    cos = (ours * ref).sum(1)
    assert cos.min().item() > (0.9999 if smoke else 0.99), cos.min().item()  # bf16 vs fp32 features

    iters = 1 if smoke else 3
    ms = time_ms(lambda: extract_features(fast, batches, device), 1, iters)
    ref_ms = time_ms(lambda: extract_features(slow, batches, device, amp=False), 1, iters)
    flops = n * vit_forward_flops(fast, size)
    rec = record(ms, spec, flops=flops, ref_ms=ref_ms, op="feature_extraction",
                 variant=f"{arch}{patch}_{size}px_b{batch}", smoke=smoke, img_s=n / (ms * 1e-3),
                 ref_img_s=n / (ref_ms * 1e-3), attention=fast.attention, min_cosine_vs_fp32=cos.min().item())
    print(json.dumps(rec))
    benchmark.extra_info.update(rec)
    benchmark.pedantic(lambda: extract_features(fast, batches, device), rounds=1, iterations=1, warmup_rounds=0)
    if not smoke:
        save_record("eval", f"{rec['op']}/{rec['variant']}", rec)
