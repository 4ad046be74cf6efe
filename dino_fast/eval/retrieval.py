"""Retrieval metrics: the revisited Oxford/Paris protocol and a plain
class-as-relevance mode.

Revisited protocol (Radenovic et al., CVPR 2018; revisitop `compute_map`,
used unchanged by the reference eval_image_retrieval.py):
- ranks (n_db, n_q): column q lists the database indices sorted by
  decreasing similarity to query q;
- per query, `ok` are the positives and `junk` the images ignored: junk are
  removed from the ranking before the positives' positions are read;
- AP is the trapezoid area under the precision-recall curve: for the j-th
  positive (0-based) at position r (junk removed),
      AP += (p0 + p1) / 2 / n_pos,   p0 = j / r (1 when r = 0),  p1 = (j + 1) / (r + 1)
- mP@k = (positives within the first k' = min(k, position of the last
  positive + 1) results) / k';
- queries without positives are left out of the means (their AP is NaN).
Splits: Easy = easy positives, junk + hard ignored; Medium = easy + hard
positives, junk ignored; Hard = hard positives, junk + easy ignored.

Plain mode (`class_retrieval`): relevance = same class; standard
non-interpolated AP (mean over positives of precision at each positive) and
recall@k = share of queries with a positive among the first k.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SPLITS = {  # name -> (positive keys, ignored keys)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def compute_ap(positions: np.ndarray, n_pos: int) -> float:
    """Trapezoid AP from the sorted 0-based positions of the positives (junk
    already removed) and the number of positives."""
    ap, step = 0.0, 1.0 / n_pos
    for j, r in enumerate(positions):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def _positions(order: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions of `ok` in the ranking `order`, each lowered
    by the number of `junk` entries ranked before it (revisitop's loop)."""
    pos = np.flatnonzero(np.isin(order, ok))
    if len(junk) == 0:
        return pos
    junk_pos = np.flatnonzero(np.isin(order, junk))
    return pos - np.searchsorted(junk_pos, pos, side="left")


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = ()) -> dict:
    """revisitop compute_map. ranks (n_db, n_q) int; gnd[q] = {"ok": [...],
    "junk": [...]}. Returns {"map", "aps" (n_q,), "mpr" (len(ks),), "prs"
    (n_q, len(ks))}; queries without positives get NaN and are excluded."""
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise ValueError(f"ranks must be (n_db, n_queries={nq}), got {ranks.shape}")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(ks)), np.nan)
    for q in range(nq):
        ok = np.asarray(gnd[q]["ok"], dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        pos = _positions(ranks[:, q], ok, junk)
        aps[q] = compute_ap(pos, len(ok))
        if len(pos) == 0:   # positives outside the ranking (a truncated one): P@k = 0
            prs[q] = 0.0
            continue
        pos1 = pos + 1  # 1-based
        for i, k in enumerate(ks):
            kq = min(int(pos1.max()), int(k))
            prs[q, i] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a positive image: check the ground truth file")
    return {"map": float(aps[valid].mean()), "aps": aps, "mpr": prs[valid].mean(axis=0) if len(ks) else np.zeros(0),
            "prs": prs}


def split_gnd(gnd: Sequence[dict], split: str) -> list[dict]:
    """The revisited ground truth (keys easy / hard / junk per query) as
    ok / junk lists for one split (easy, medium, hard)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    ok_keys, junk_keys = SPLITS[split]
    out = []
    for g in gnd:
        out.append({"ok": np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in ok_keys]),
                    "junk": np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in junk_keys])})
    return out


@torch.no_grad()
def rank_database(db: torch.Tensor, queries: torch.Tensor, *, block: int = 256) -> np.ndarray:
    """ranks (n_db, n_q): database indices by decreasing cosine similarity
    (features L2-normalised by the caller), computed `block` queries at a
    time (a (n_db, block) similarity block at once)."""
    out = np.empty((db.shape[0], queries.shape[0]), dtype=np.int64)
    for q0 in range(0, queries.shape[0], block):
        sim = db @ queries[q0:q0 + block].T                    # (n_db, b)
        out[:, q0:q0 + block] = torch.argsort(-sim, dim=0, stable=True).cpu().numpy()
    return out


def revisited_evaluate(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10),
                       splits: Sequence[str] = ("medium", "hard")) -> dict:
    """{split: {"map", "mp@k": {k: ...}}} in percent, as revisitop prints."""
    res = {}
    for s in splits:
        r = compute_map(ranks, split_gnd(gnd, s), ks)
        res[s] = {"map": 100.0 * r["map"], "mp@k": {int(k): 100.0 * float(v) for k, v in zip(ks, r["mpr"])}}
    return res


@torch.no_grad()
def class_retrieval(db: torch.Tensor, db_labels: torch.Tensor, queries: torch.Tensor, q_labels: torch.Tensor,
                    ks: Sequence[int] = (1, 5, 10), *, exclude_self: bool = False, block: int = 256) -> dict:
    """Retrieval with the class as relevance. db (N, D), queries (M, D)
    L2-normalised; exclude_self: queries are the database itself (row i of
    queries is row i of db), each query's own entry is taken out.
    Returns {"map", "recall@k": {k}, "precision@k": {k}} in percent; AP is
    the mean of the precision at each positive's rank."""
    n = db.shape[0]
    db_labels, q_labels = db_labels.to(db.device), q_labels.to(db.device)
    ks = sorted(set(int(k) for k in ks))
    if exclude_self and queries.shape[0] != n:
        raise ValueError("exclude_self needs the queries to be the database")
    aps, hits, precs, counted = [], {k: 0.0 for k in ks}, {k: 0.0 for k in ks}, 0
    for q0 in range(0, queries.shape[0], block):
        sim = queries[q0:q0 + block] @ db.T                    # (b, N)
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + q0] = float("-inf")
        order = torch.argsort(-sim, dim=1, stable=True)        # (b, N)
        rel = db_labels[order].eq(q_labels[q0:q0 + block, None]).double()   # (b, N) 1 = relevant
        if exclude_self:
            rel = rel[:, :n - 1]                               # the query itself is last (-inf)
        npos = rel.sum(1)                                      # (b,)
        cum = rel.cumsum(1)
        ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=rel.dtype)
        ap = (rel * cum / ranks).sum(1) / npos.clamp(min=1)
        valid = npos > 0
        aps.append(ap[valid])
        counted += int(valid.sum())
        for k in ks:
            hits[k] += float((cum[valid, min(k, rel.shape[1]) - 1] > 0).sum())
            precs[k] += float((cum[valid, min(k, rel.shape[1]) - 1] / min(k, rel.shape[1])).sum())
    if counted == 0:
        raise ValueError("no query has a relevant database image (no shared class)")
    return {"map": 100.0 * float(torch.cat(aps).mean()),
            "recall@k": {k: 100.0 * hits[k] / counted for k in ks},
            "precision@k": {k: 100.0 * precs[k] / counted for k in ks},
            "queries": counted}


__all__ = ["SPLITS", "class_retrieval", "compute_ap", "compute_map", "rank_database", "revisited_evaluate",
           "split_gnd"]
