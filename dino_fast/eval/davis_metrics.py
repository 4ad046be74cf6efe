"""DAVIS-2017 semi-supervised metrics, as the official toolkit
(davisvideochallenge/davis2017-evaluation, davis2017/metrics.py + utils.py):

- J (region similarity): |S ∩ G| / |S ∪ G| per frame, 1 when both are empty.
- F (boundary F-measure): 1-pixel boundary maps of S and G (`seg2bmap`),
  each dilated by a disk of radius ceil(0.008 * image diagonal); precision =
  share of S's boundary pixels within the dilated G boundary, recall the
  converse, F = 2PR / (P + R) (P = 1, R = 0 when S has no boundary but G
  does, and so on, as the toolkit).
- per object: mean over the evaluated frames (all but the first and last),
  recall (share of frames > 0.5) and decay (mean of the first quarter minus
  the last quarter); the reported J / F means are over all objects of all
  sequences, J&F their average.

The toolkit dilates with cv2 and a skimage disk; here the same disk
dilation is done with NumPy prefix sums (no OpenCV, no SciPy).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

BOUND_TH = 0.008


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None):
    """J per frame: arrays (..., H, W) of any dtype (non-zero = object)."""
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ in shape")
    a, s = annotation.astype(bool), segmentation.astype(bool)
    keep = ~void_pixels.astype(bool) if void_pixels is not None else np.ones_like(a)
    inters = np.sum(s & a & keep, axis=(-2, -1))
    union = np.sum((s | a) & keep, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inters / union
    if np.ndim(j) == 0:
        return 1.0 if np.isclose(union, 0) else float(j)
    j[np.isclose(union, 0)] = 1
    return j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary map of a binary mask (H, W): a pixel is on the
    boundary when it differs from its east, south or south-east neighbour
    (the toolkit's / Martin et al.'s seg2bmap at the mask's own size)."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) mask by the disk {dy^2 + dx^2 <= r^2}
    (skimage's disk(r), what the toolkit passes to cv2.dilate): for every
    row offset dy the disk is the run |dx| <= isqrt(r^2 - dy^2), found with
    row-wise prefix sums, inside the mask's bounding box grown by r. Exact."""
    m = mask.astype(bool)
    out = np.zeros_like(m)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return out
    r = int(radius)
    y0, y1 = max(rows[0] - r, 0), min(rows[-1] + r + 1, m.shape[0])
    x0, x1 = max(cols[0] - r, 0), min(cols[-1] + r + 1, m.shape[1])
    sub = m[y0:y1, x0:x1]
    H, W = sub.shape
    cs = np.zeros((H, W + 1), dtype=np.int32)
    np.cumsum(sub, axis=1, out=cs[:, 1:])                                # cs[:, x] = count in [0, x)
    x = np.arange(W)
    acc = np.zeros_like(sub)
    for w in sorted({math.isqrt(r * r - dy * dy) for dy in range(r + 1)}):
        run = (cs[:, np.minimum(x + w + 1, W)] - cs[:, np.maximum(x - w, 0)]) > 0   # any in [x - w, x + w]
        for dy in range(r + 1):
            if math.isqrt(r * r - dy * dy) != w:
                continue
            acc[:H - dy] |= run[dy:]                                     # acc[y] |= run[y + dy]
            if dy:
                acc[dy:] |= run[:H - dy]                                 # acc[y] |= run[y - dy]
    out[y0:y1, x0:x1] = acc
    return out


def f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, void_pixels: np.ndarray | None = None,
              bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of one frame (H, W)."""
    if foreground_mask.shape != gt_mask.shape or foreground_mask.ndim != 2:
        raise ValueError(f"f_measure needs two (H, W) masks, got {foreground_mask.shape} and {gt_mask.shape}")
    keep = ~void_pixels.astype(bool) if void_pixels is not None else np.ones(gt_mask.shape, dtype=bool)
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*foreground_mask.shape))
    fg_boundary = seg2bmap(foreground_mask.astype(bool) & keep)
    gt_boundary = seg2bmap(gt_mask.astype(bool) & keep)
    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        r = int(bound_pix)
        precision = np.sum(fg_boundary & dilate_disk(gt_boundary, r)) / n_fg
        recall = np.sum(gt_boundary & dilate_disk(fg_boundary, r)) / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None,
                     bound_th: float = BOUND_TH):
    """F per frame: (H, W) -> float, (T, H, W) -> (T,)."""
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ in shape")
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    if annotation.ndim != 3:
        raise ValueError(f"db_eval_boundary supports (H, W) or (T, H, W) masks, got {annotation.ndim} dims")
    return np.array([f_measure(segmentation[t], annotation[t], None if void_pixels is None else void_pixels[t],
                               bound_th) for t in range(annotation.shape[0])])


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame values (the toolkit's
    db_statistics: NaN-aware, 4 bins for the decay)."""
    per_frame = np.asarray(per_frame, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)   # NaN-only bins, as the toolkit
        mean = float(np.nanmean(per_frame))
        recall = float(np.nanmean(per_frame > 0.5))
        ids = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(np.int64)
        bins = [per_frame[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def split_objects(masks: np.ndarray, num_objects: int) -> np.ndarray:
    """Indexed masks (T, H, W) -> per object booleans (num_objects, T, H, W)."""
    ids = np.arange(1, num_objects + 1)[:, None, None, None]
    return masks[None] == ids


def evaluate_sequence(gt: np.ndarray, res: np.ndarray, bound_th: float = BOUND_TH) -> dict:
    """Semi-supervised evaluation of one sequence. gt, res: indexed masks
    (T, H, W) (gt: void 255 already zeroed; object ids 1..n from gt's first
    frame). The first and last frames are not evaluated (the toolkit).
    Returns {"J": [(M, R, D) per object], "F": [...], "J_frames", "F_frames"}."""
    if gt.shape != res.shape:
        raise ValueError(f"results {res.shape} and annotations {gt.shape} differ in shape (frames, H, W)")
    n_obj = int(gt[0].max())
    n_res = int(res.max()) if res.size else 0
    if n_res > n_obj:
        raise ValueError(f"the results hold object id {n_res} but the first annotation has {n_obj} objects")
    g = split_objects(gt[1:-1], n_obj)
    r = split_objects(res[1:-1], n_obj)
    J = np.zeros(g.shape[:2])
    F = np.zeros(g.shape[:2])
    for o in range(n_obj):
        J[o] = db_eval_iou(g[o], r[o])
        F[o] = db_eval_boundary(g[o], r[o], bound_th=bound_th)
    return {"J": [db_statistics(J[o]) for o in range(n_obj)], "F": [db_statistics(F[o]) for o in range(n_obj)],
            "J_frames": J, "F_frames": F}


def summarize(per_sequence: dict[str, dict]) -> dict:
    """Global numbers over all objects of all sequences, in the toolkit's
    terms (fractions in [0, 1]): J&F-Mean, J-Mean, J-Recall, J-Decay,
    F-Mean, F-Recall, F-Decay, plus per-object means."""
    js = [s for seq in per_sequence.values() for s in seq["J"]]
    fs = [s for seq in per_sequence.values() for s in seq["F"]]
    if not js:
        raise ValueError("no object was evaluated")
    jm, jr, jd = (float(np.mean([s[i] for s in js])) for i in range(3))
    fm, fr, fd = (float(np.mean([s[i] for s in fs])) for i in range(3))
    per_object = {f"{name}_{o + 1}": {"J": seq["J"][o][0], "F": seq["F"][o][0]}
                  for name, seq in per_sequence.items() for o in range(len(seq["J"]))}
    return {"J&F-Mean": (jm + fm) / 2, "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
            "F-Mean": fm, "F-Recall": fr, "F-Decay": fd, "per_object": per_object}
