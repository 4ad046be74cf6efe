"""Copy detection on Copydays, as the reference eval_copy_detection.py.

Layout (the reference CopydaysDataset):

    <data_path>/original/*.jpg           the database: 157 originals
    <data_path>/strong/*.jpg             229 strong attacks (print-scan, paint, ...)
    <data_path>/jpegqual/<q>/*.jpg       JPEG quality q (3 ... 75), same names as original/
    <data_path>/crops/<c>/*.jpg          c % of the surface cropped away, same names

Every block present is a query block (the originals too, as the reference).
Positives: a strong attack matches the originals whose file name starts with
the same 4 characters (Copydays: 2000xx.jpg are the attacks of 200000.jpg);
a JPEG / crop copy matches the original of the same file name.

Protocol: features [CLS | GeM_4(patches)] of square-resized images, PCA
whitening learned on a separate image set (optional), L2 normalisation,
cosine similarity against originals (+ optional distractor images), AP from
the positives' ranks among the first `topk` (= 20) results (Holidays
trapezoid AP, as the reference), mAP per block.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dino_fast.eval.data import IMAGE_EXTENSIONS
from dino_fast.eval.retrieval import compute_ap

STRONG_PREFIX = 4  # characters of the file name shared by an original and its strong attacks


def _images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


@dataclass
class CopydaysLayout:
    root: str
    originals: list[str]                              # file names in original/
    blocks: dict[str, list[str]] = field(default_factory=dict)   # block ("strong", "jpegqual/3") -> names

    def paths(self, block: str) -> list[str]:
        return [os.path.join(self.root, block, n) for n in (self.originals if block == "original" else self.blocks[block])]

    def query_blocks(self) -> list[str]:
        return ["original"] + list(self.blocks)


def load_copydays(root: str) -> CopydaysLayout:
    """Read and check the layout; errors name the folder and what is expected."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder (--data_path). Expected Copydays: original/, strong/, "
                                "jpegqual/<quality>/, crops/<percent>/")
    orig_dir = os.path.join(root, "original")
    if not os.path.isdir(orig_dir):
        raise FileNotFoundError(f"{orig_dir}: missing; Copydays needs the original/ folder (the database of "
                                "157 originals) beside strong/, jpegqual/ and crops/")
    originals = _images(orig_dir)
    if not originals:
        raise ValueError(f"{orig_dir}: no images; put the Copydays originals (200000.jpg ...) there")
    layout = CopydaysLayout(root, originals)
    if os.path.isdir(os.path.join(root, "strong")):
        layout.blocks["strong"] = _images(os.path.join(root, "strong"))
    for group in ("jpegqual", "crops"):
        gdir = os.path.join(root, group)
        if not os.path.isdir(gdir):
            continue
        subs = [s for s in os.listdir(gdir) if os.path.isdir(os.path.join(gdir, s))]
        for s in sorted(subs, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
            layout.blocks[f"{group}/{s}"] = _images(os.path.join(gdir, s))
    empty = [b for b, names in layout.blocks.items() if not names]
    if empty:
        raise ValueError(f"{os.path.join(root, empty[0])}: no images; remove the empty folder or fill it")
    if not layout.blocks:
        raise FileNotFoundError(f"{root}: no query folder; Copydays queries are in strong/, jpegqual/<q>/ "
                                "or crops/<c>/ next to original/")
    known = set(originals)
    for b, names in layout.blocks.items():
        if b == "strong":
            prefixes = {n[:STRONG_PREFIX] for n in originals}
            orphan = [n for n in names if n[:STRONG_PREFIX] not in prefixes]
        else:
            orphan = [n for n in names if n not in known]
        if orphan:
            rule = (f"an original whose name starts with {orphan[0][:STRONG_PREFIX]!r}" if b == "strong"
                    else f"original/{orphan[0]}")
            raise ValueError(f"{os.path.join(root, b, orphan[0])}: no matching original (expected {rule}); "
                             "Copydays copies keep their original's file name")
    return layout


def positives(layout: CopydaysLayout, block: str) -> list[list[int]]:
    """Database indices of the positives of every query of `block`."""
    index = {n: i for i, n in enumerate(layout.originals)}
    if block == "original":
        return [[i] for i in range(len(layout.originals))]
    if block == "strong":
        return [[i for i, o in enumerate(layout.originals) if o[:STRONG_PREFIX] == q[:STRONG_PREFIX]]
                for q in layout.blocks[block]]
    return [[index[q]] for q in layout.blocks[block]]


def topk_ap(indices: np.ndarray, positives_per_query: Sequence[Sequence[int]]) -> np.ndarray:
    """AP per query from its first k retrieved database indices (q, k):
    positives beyond the first k count as not found (the reference)."""
    out = np.zeros(len(positives_per_query))
    for q, pos in enumerate(positives_per_query):
        ranks = np.flatnonzero(np.isin(indices[q], np.asarray(pos)))
        out[q] = compute_ap(ranks, len(pos))
    return out


Extract = Callable[[list[str]], torch.Tensor]   # image paths -> (N, D) features


@torch.no_grad()
def copy_detection(layout: CopydaysLayout, extract: Extract, *, whitening_paths: Sequence[str] | None = None,
                   distractor_paths: Sequence[str] | None = None, topk: int = 20,
                   centered_whitening: bool = False) -> dict:
    """The whole protocol with `extract(paths) -> (N, D)` features. Returns
    {"blocks": {block: mAP %}, "mean_copies": mean over the non-original
    blocks, "database": size, "whitening": {...} or None}."""
    from dino_fast.eval.whitening import PCAWhitening
    queries = {b: extract(layout.paths(b)) for b in layout.query_blocks()}
    db = queries["original"]
    if distractor_paths:
        db = torch.cat((db, extract(list(distractor_paths)).to(db.device, db.dtype)))
    white = None
    if whitening_paths:
        white = PCAWhitening(centered=centered_whitening).fit(extract(list(whitening_paths)))
        db = white.apply(db)
        queries = {b: white.apply(q) for b, q in queries.items()}
    db = F.normalize(db.float(), dim=1)
    k = min(topk, db.shape[0])
    blocks = {}
    for b, q in queries.items():
        sim = F.normalize(q.float(), dim=1) @ db.T                          # (n_q, n_db)
        idx = sim.topk(k, dim=1, largest=True, sorted=True).indices.cpu().numpy()
        blocks[b] = 100.0 * float(topk_ap(idx, positives(layout, b)).mean())
    copies = [v for b, v in blocks.items() if b != "original"]
    return {"blocks": blocks, "mean_copies": float(np.mean(copies)) if copies else float("nan"),
            "database": int(db.shape[0]), "topk": k,
            "whitening": None if white is None else {"images": len(whitening_paths), "energy_kept": white.energy,
                                                     "centered": centered_whitening}}
