"""DAVIS metrics against hand-checked cases (shifted squares with known J
and F, a boundary map drawn by hand, per-object statistics) and against
the toolkit's f_measure written with SciPy's binary dilation and
scikit-image's disk (what the toolkit does with cv2.dilate)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dino_fast.eval.davis_metrics import (db_eval_boundary, db_eval_iou, db_statistics, evaluate_sequence,
                                          f_measure, seg2bmap, summarize)


def square(shape, r0, c0, side):
    m = np.zeros(shape, dtype=np.uint8)
    m[r0:r0 + side, c0:c0 + side] = 1
    return m


def test_iou_of_shifted_squares():
    g = square((40, 40), 0, 0, 10)
    s = square((40, 40), 5, 0, 10)
    assert db_eval_iou(g, s) == pytest.approx(50 / 150)          # overlap 5 x 10, union 15 x 10
    assert db_eval_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0   # both empty
    void = np.zeros((40, 40), dtype=bool)
    void[10:15] = True                                            # the rows only s covers
    assert db_eval_iou(g, s, void) == pytest.approx(50 / 100)
    frames = np.stack([g, g])
    np.testing.assert_allclose(db_eval_iou(frames, np.stack([s, g])), [1 / 3, 1.0])


def test_seg2bmap_by_hand():
    m = square((6, 6), 1, 1, 3)
    # a pixel is on the boundary when it differs from its E, S or SE neighbour: the outline of
    # the square moved half a pixel towards the origin
    want = np.array([[1, 1, 1, 1, 0, 0],
                     [1, 0, 0, 1, 0, 0],
                     [1, 0, 0, 1, 0, 0],
                     [1, 1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(seg2bmap(m), want)


def test_boundary_f_of_shifted_squares():
    # 100 x 100 frame: tolerance ceil(0.008 * 141.4) = 2 px. Each square's boundary is a 41 x 41
    # point outline (160 points).
    g = square((100, 100), 20, 20, 40)
    assert f_measure(g, g) == 1.0
    # shifted 2 columns: every boundary point within 2 px of the other outline
    assert f_measure(square((100, 100), 20, 22, 40), g) == 1.0
    # shifted 3 columns: of s's 160 outline points, the right side (41) and the left side but its
    # 3 points next to each corner (35) are 3 px from g's outline: precision = recall = 84/160
    s3 = square((100, 100), 20, 23, 40)
    assert f_measure(s3, g) == pytest.approx(84 / 160)
    assert db_eval_iou(g, s3) == pytest.approx(37 / 43)
    # empty prediction against an object: P = 1, R = 0 -> F = 0; both empty: 1
    assert f_measure(np.zeros_like(g), g) == 0.0
    assert f_measure(np.zeros_like(g), np.zeros_like(g)) == 1.0
    np.testing.assert_allclose(db_eval_boundary(np.stack([g, g]), np.stack([g, s3])), [1.0, 84 / 160])


def _toolkit_f_measure(foreground_mask, gt_mask, bound_th=0.008):
    """davis2017/metrics.py f_measure with cv2.dilate replaced by
    scipy.ndimage.binary_dilation (the same for a symmetric disk)."""
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary, gt_boundary = seg2bmap(foreground_mask), seg2bmap(gt_mask)
    fg_dil = binary_dilation(fg_boundary, disk(bound_pix))
    gt_dil = binary_dilation(gt_boundary, disk(bound_pix))
    gt_match, fg_match = gt_boundary * fg_dil, fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", range(4))
def test_boundary_f_matches_toolkit_on_blobs(seed):
    from skimage.data import binary_blobs
    shape = (72, 130) if seed % 2 else (130, 90)             # tolerance 2 px; DAVIS 480p: 8 px
    g = binary_blobs(max(shape), blob_size_fraction=0.2, volume_fraction=0.3, rng=seed)[:shape[0], :shape[1]]
    s = np.roll(binary_blobs(max(shape), blob_size_fraction=0.2, volume_fraction=0.3, rng=seed)[:shape[0], :shape[1]],
                seed + 1, axis=1)
    s[: 5 * seed] = False
    assert f_measure(s, g) == pytest.approx(_toolkit_f_measure(s, g), abs=1e-12)
    big = np.zeros((480, 854), dtype=bool)                     # DAVIS size: radius 8
    big[100:300, 200:500] = True
    pred = np.roll(big, (5, -9), axis=(0, 1))
    assert f_measure(pred, big) == pytest.approx(_toolkit_f_measure(pred, big), abs=1e-12)


def test_db_statistics_by_hand():
    v = np.array([1.0, 0.4, 0.6, 0.8, 0.2, 0.0, 1.0, 0.9])
    mean, recall, decay = db_statistics(v)
    assert mean == pytest.approx(v.mean())
    assert recall == pytest.approx(5 / 8)                         # 1, .6, .8, 1, .9 are > 0.5
    # bins from round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]: first [0:3], last [5:8]
    assert decay == pytest.approx((1.0 + 0.4 + 0.6) / 3 - (0.0 + 1.0 + 0.9) / 3)


def test_sequence_evaluation_skips_first_and_last_frames():
    shape = (100, 100)
    g1, g2 = square(shape, 20, 20, 40), 2 * square(shape, 70, 70, 20)
    gt = np.stack([g1 + g2] * 4)                                   # two objects, 4 frames
    res = gt.copy()
    res[0] = 0                                                     # first and last frames are not scored
    res[-1] = 0
    res[1] = square(shape, 20, 23, 40) + g2                        # object 1 shifted 3 px in frame 1
    out = evaluate_sequence(gt, res)
    (j1, jr1, _), (j2, _, _) = out["J"]
    (f1, _, _), (f2, _, _) = out["F"]
    assert j1 == pytest.approx((37 / 43 + 1) / 2) and jr1 == 1.0
    assert f1 == pytest.approx((84 / 160 + 1) / 2)
    assert j2 == 1.0 and f2 == 1.0
    s = summarize({"seq": out})
    assert s["J-Mean"] == pytest.approx((j1 + j2) / 2) and s["F-Mean"] == pytest.approx((f1 + f2) / 2)
    assert s["J&F-Mean"] == pytest.approx((s["J-Mean"] + s["F-Mean"]) / 2)
    assert set(s["per_object"]) == {"seq_1", "seq_2"}
    with pytest.raises(ValueError, match="object id 3"):
        evaluate_sequence(gt, np.where(res == 2, 3, res))
    # radius used at DAVIS resolution, for the record
    assert math.ceil(0.008 * math.hypot(480, 854)) == 8


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 8])
def test_disk_dilation_matches_scipy(radius):
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk

    from dino_fast.eval.davis_metrics import dilate_disk
    rng = np.random.default_rng(radius)
    m = rng.random((37, 53)) > 0.97
    m[0, 0] = m[-1, -1] = m[0, -1] = True                        # points on the borders
    np.testing.assert_array_equal(dilate_disk(m, radius), binary_dilation(m, disk(radius)))
