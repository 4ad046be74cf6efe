"""Weighted k-NN classification on L2-normalised features, as the reference
eval_knn.py (Wu et al. 2018 voting, used by DINO), without an N x N matrix.

Math (per test feature q, train features x_j with labels y_j, all unit norm):
    s_j   = <q, x_j>                               cosine similarity
    N_k   = indices of the k largest s_j           (sorted, descending)
    p_c   = sum_{j in N_k, y_j = c} exp(s_j / T)   class votes
    top-1 = argmax_c p_c ; top-5 = the 5 largest p_c (the first min(5, k) ranks:
            "top5 does not make sense if k < 5", as the reference)

Memory: the reference multiplies 1/100 of the test set with the whole train
set at once (a (N_test/100, N_train) fp32 block; 5 GB for ImageNet) and builds
a (chunk * k, num_classes) one-hot. Here both sides are chunked: a
(test_chunk, train_chunk) similarity block lives at a time, and a running
top-k merge (keep the best k of [current best k | this block's best k])
gives exactly the top-k of the full row. The neighbours are searched once for
the largest k; every smaller k is a prefix of that sorted list. The vote is a
scatter-add of exp(s/T) into (test_chunk, num_classes) (no one-hot).

Ties: classes with equal votes (in practice: classes with no vote when fewer
than 5 classes are among the neighbours) are ranked by class index (stable
sort). The reference leaves that order to torch.sort.
"""
from __future__ import annotations

from typing import Iterable

import torch

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_T = 0.07
# Bytes of one (test_chunk, train_chunk) fp32 similarity block (+ its top-k work).
DEFAULT_BLOCK_BYTES = 1 << 29  # 512 MiB


def _chunk_sizes(n_test: int, n_train: int, k: int, block_bytes: int,
                 test_chunk: int | None, train_chunk: int | None) -> tuple[int, int]:
    """Pick block sizes so a (test_chunk, train_chunk) fp32 block fits in
    `block_bytes`. Train columns first (whole rows when they fit)."""
    if train_chunk is None:
        rows = test_chunk or min(n_test, 1024)
        train_chunk = max(k, min(n_train, block_bytes // (4 * max(rows, 1))))
    if test_chunk is None:
        test_chunk = max(1, min(n_test, block_bytes // (4 * train_chunk)))
    return max(1, int(test_chunk)), max(1, int(train_chunk))


@torch.no_grad()
def knn_neighbors(train_features: torch.Tensor, test_features: torch.Tensor, k: int, *,
                  test_chunk: int | None = None, train_chunk: int | None = None,
                  block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar train rows of every test row.

    train_features (N, D), test_features (M, D), same device and dtype.
    Returns (similarities (M, k) sorted descending, indices (M, k) int64),
    computed block by block: never more than (test_chunk, train_chunk)
    similarities at once.
    """
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(f"features must be 2-D (N, D); got train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train D={train_features.shape[1]}, test D={test_features.shape[1]}; "
                         "extract both with the same model")
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"k={k} must be between 1 and the number of train features ({n_train})")
    test_features = test_features.to(train_features.device, train_features.dtype)
    rows, cols = _chunk_sizes(n_test, n_train, k, block_bytes, test_chunk, train_chunk)
    out_sim = torch.empty(n_test, k, device=train_features.device, dtype=train_features.dtype)
    out_idx = torch.empty(n_test, k, device=train_features.device, dtype=torch.int64)
    for r0 in range(0, n_test, rows):
        q = test_features[r0:r0 + rows]                       # (b, D)
        best_sim = best_idx = None
        for c0 in range(0, n_train, cols):
            sim = q @ train_features[c0:c0 + cols].T          # (b, n)
            s, i = sim.topk(min(k, sim.shape[1]), dim=1)      # (b, <=k) sorted
            i = i + c0
            if best_sim is not None:                          # running merge: best k of 2k
                s = torch.cat((best_sim, s), dim=1)           # (b, <=2k)
                i = torch.cat((best_idx, i), dim=1)
                s, j = s.topk(min(k, s.shape[1]), dim=1)
                i = i.gather(1, j)
            best_sim, best_idx = s, i
        out_sim[r0:r0 + rows] = best_sim
        out_idx[r0:r0 + rows] = best_idx
    return out_sim, out_idx


@torch.no_grad()
def knn_vote(sim: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, k: int, T: float,
             num_classes: int, *, rows: int = 4096) -> torch.Tensor:
    """Class ranking (M, num_classes) from the first k neighbours (sorted
    descending): votes exp(s/T) per class, then a stable descending sort."""
    train_labels = train_labels.to(idx.device)
    ranks = torch.empty(sim.shape[0], num_classes, dtype=torch.int64, device=idx.device)
    for r0 in range(0, sim.shape[0], rows):
        s, i = sim[r0:r0 + rows, :k], idx[r0:r0 + rows, :k]    # (b, k)
        weights = s.float().div(T).exp()                        # exp(s / T)
        neighbours = train_labels[i]                            # (b, k) labels
        votes = torch.zeros(s.shape[0], num_classes, device=s.device, dtype=torch.float32)
        votes.scatter_add_(1, neighbours, weights)              # (b, C)
        ranks[r0:r0 + rows] = votes.sort(dim=1, descending=True, stable=True).indices
    return ranks


def _topk_accuracy(ranks: torch.Tensor, test_labels: torch.Tensor, k: int) -> tuple[float, float]:
    correct = ranks.eq(test_labels.to(ranks.device).view(-1, 1))      # (M, C)
    n5 = min(5, k, ranks.shape[1])  # top5 does not make sense if k < 5 (reference)
    total = max(test_labels.shape[0], 1)
    top1 = correct[:, :1].sum().item() * 100.0 / total
    top5 = correct[:, :n5].sum().item() * 100.0 / total
    return top1, top5


def _check_labels(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int) -> None:
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, num_classes={num_classes}); "
                             f"got [{int(labels.min())}, {int(labels.max())}]")


def clip_ks(ks: Iterable[int], n_train: int) -> tuple[list[int], str | None]:
    """The k values with those above the train-set size replaced by it (sorted, unique), and a
    warning naming the clipped values (None when nothing was clipped)."""
    ks = sorted(set(int(k) for k in ks))
    over = [k for k in ks if k > n_train]
    if not over:
        return ks, None
    clipped = sorted({min(k, n_train) for k in ks})
    return clipped, (f"{' '.join(map(str, over))} exceed{'s' if len(over) == 1 else ''} the {n_train} train "
                     f"images: using k = {' '.join(map(str, clipped))} (a k-NN vote cannot have more neighbours "
                     "than train images)")


@torch.no_grad()
def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Iterable[int] = DEFAULT_KS, T: float = DEFAULT_T,
                 num_classes: int | None = None, **chunks) -> dict[int, tuple[float, float]]:
    """{k: (top1, top5)} in percent for every k, with one neighbour search
    (for the largest k). `num_classes` defaults to max label + 1."""
    ks = sorted(set(int(k) for k in ks))
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    _check_labels(train_labels, test_labels, num_classes)
    kmax = min(ks[-1], train_features.shape[0])
    sim, idx = knn_neighbors(train_features, test_features, kmax, **chunks)
    results = {}
    for k in ks:
        if k > train_features.shape[0]:
            raise ValueError(f"k={k} is larger than the number of train features ({train_features.shape[0]})")
        ranks = knn_vote(sim, idx, train_labels, k, T, num_classes)
        results[k] = _topk_accuracy(ranks, test_labels, k)
    return results


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int, T: float = DEFAULT_T, num_classes: int | None = None, **chunks) -> torch.Tensor:
    """Class ranking (M, num_classes) of every test row (column 0: the prediction)."""
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    sim, idx = knn_neighbors(train_features, test_features, k, **chunks)
    return knn_vote(sim, idx, train_labels, k, T, num_classes)


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int = 1000,
                   **chunks) -> tuple[float, float]:
    """(top1, top5) in percent: the reference eval_knn.py `knn_classifier`,
    chunked (see the module docstring). `chunks`: test_chunk, train_chunk,
    block_bytes."""
    return knn_evaluate(train_features, train_labels, test_features, test_labels, (k,), T,
                        num_classes, **chunks)[k]


@torch.no_grad()
def knn_classifier_reference(train_features: torch.Tensor, train_labels: torch.Tensor,
                             test_features: torch.Tensor, test_labels: torch.Tensor, k: int, T: float,
                             num_classes: int = 1000) -> tuple[float, float]:
    """The reference eval_knn.py loop, kept as is for tests and benches: the
    test set in 100 chunks, each against the full train matrix, a one-hot
    (chunk * k, num_classes) vote. Two changes: at least one row per chunk
    (the reference divides by zero below 100 test rows) and a stable sort of
    the votes (the tie order of zero-vote classes is otherwise unspecified)."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = max(1, num_test_images // num_chunks)
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                      distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(dim=1, descending=True, stable=True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k, num_classes)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total


def format_table(results: dict[int, tuple[float, float]], title: str = "") -> str:
    """Plain-text table of {k: (top1, top5)}."""
    lines = [title] if title else []
    lines += [f"{'k':>5}  {'top-1':>7}  {'top-5':>7}"]
    lines += [f"{k:>5}  {t1:>7.2f}  {t5:>7.2f}" for k, (t1, t5) in sorted(results.items())]
    return "\n".join(lines)


__all__ = ["DEFAULT_KS", "DEFAULT_T", "clip_ks", "knn_neighbors", "knn_vote", "knn_evaluate", "knn_predict",
           "knn_classifier", "knn_classifier_reference", "format_table"]
