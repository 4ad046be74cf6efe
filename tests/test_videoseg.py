"""Label propagation: the neighbourhood mask and one propagation step
against literal ports of the reference eval_video_segmentation.py, the
queue, and a synthetic video (an object cut from a photograph moving over
another photograph, known masks) where propagation beats a frozen
first-frame mask by far in J&F; the `dino-fast videoseg` command on the
DAVIS layout (indexed PNGs, palette, J/F JSON, layout errors)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval.davis_metrics import evaluate_sequence, summarize
from dino_fast.eval.videoseg import (LabelPropagation, first_mask_onehot, frame_size, neighborhood_mask, propagate,
                                     segment_video, soft_to_labels)
from tests._photos import photo, tiny_vit_checkpoint


def _reference_restrict_neighborhood(h, w, size):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if i - size + p < 0 or i - size + p >= h:
                        continue
                    if j - size + q < 0 or j - size + q >= w:
                        continue
                    mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w)


def _reference_label_propagation(feat_tar, list_frame_feats, list_segs, topk, mask_neighborhood, h, w):
    """The reference's label_propagation after extract_feature: feat_tar (hw, D),
    list_frame_feats [(D, hw)], list_segs [(1, C, h, w)]."""
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if mask_neighborhood is not None:
        aff *= mask_neighborhood.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, C, h, w = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T
    return torch.mm(segs, aff).reshape(C, h, w)


@pytest.mark.parametrize("h,w,size", [(5, 7, 1), (6, 4, 2), (3, 3, 0)])
def test_neighborhood_mask_matches_reference(h, w, size):
    assert torch.equal(neighborhood_mask(h, w, size), _reference_restrict_neighborhood(h, w, size).bool())


@pytest.mark.parametrize("masked", [True, False])
def test_propagation_step_matches_reference(masked):
    g = torch.Generator().manual_seed(0)
    h, w, D, C, n = 6, 9, 16, 3, 3
    tar = torch.randn(h * w, D, generator=g)
    src = [torch.randn(D, h * w, generator=g) for _ in range(n)]
    segs = [torch.rand(1, C, h, w, generator=g) for _ in range(n)]
    mask = neighborhood_mask(h, w, 2) if masked else None
    ref = _reference_label_propagation(tar, src, segs, 5, mask.float() if masked else None, h, w)
    ours = propagate(F.normalize(tar, dim=1), F.normalize(torch.stack([s.T for s in src]), dim=2),
                     torch.stack([s.reshape(C, -1) for s in segs]), topk=5, temperature=0.1, mask=mask,
                     chunk=7)                                  # 54 targets in chunks of 7
    torch.testing.assert_close(ours.reshape(C, h, w), ref, rtol=1e-5, atol=1e-6)


def test_queue_keeps_first_frame_and_last_n():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(4, 5, 8, generator=g) for _ in range(6)]
    seg0 = F.one_hot(torch.randint(0, 2, (4, 5), generator=g), 2).permute(2, 0, 1).float()
    prop = LabelPropagation(feats[0], seg0, n_last_frames=2, size_mask_neighborhood=1)
    outs = [prop.step(f) for f in feats[1:]]
    assert len(prop.queue) == 2
    torch.testing.assert_close(prop.queue[-1][1].reshape(2, 4, 5), outs[-1])
    assert all(torch.allclose(o.sum(0), torch.ones(4, 5)) for o in outs)   # soft masks of one-hot sources sum to 1


def _moving_object_video(n_frames=10, size=(96, 128), step=(3, 7), radius=18):
    """Frames (n, H, W, 3) uint8: a disk cut from `coffee` moving over `camera`; masks (n, H, W)."""
    H, W = size
    bg = photo("camera", (W, H))
    fg = photo("coffee", (W, H))
    yy, xx = np.mgrid[:H, :W]
    frames, masks = [], []
    for t in range(n_frames):
        cy, cx = 28 + step[0] * t, 24 + step[1] * t
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        fr = bg.copy()
        fr[m] = np.roll(fg, (cy - H // 2, cx - W // 2), axis=(0, 1))[m]     # the texture moves with the object
        frames.append(fr)
        masks.append(m.astype(np.uint8))
    return np.stack(frames), np.stack(masks)


def _pixel_patch_features(frame: np.ndarray, p: int) -> torch.Tensor:
    """Identity-like patch features: each p x p patch's pixels (h, w, 3p^2), centred."""
    x = torch.from_numpy(frame).float().permute(2, 0, 1)[None] / 255
    cols = F.unfold(x, p, stride=p)[0].T                                    # (h*w, 3p^2)
    h, w = frame.shape[0] // p, frame.shape[1] // p
    return (cols - cols.mean(1, keepdim=True)).reshape(h, w, -1)


def test_propagation_tracks_a_moving_object():
    frames, masks = _moving_object_video()
    p = 4                                   # 4 px patches: a 24 x 32 grid, the object ~9 patches wide
    grid = (frames.shape[1] // p, frames.shape[2] // p)
    seg0 = first_mask_onehot(masks[0], grid, 2)
    soft = segment_video((_pixel_patch_features(f, p) for f in frames), seg0, n_last_frames=7, topk=5,
                         temperature=0.1, size_mask_neighborhood=4)
    pred = np.stack([masks[0]] + [soft_to_labels(s, p, masks.shape[1:]) for s in soft])
    frozen = np.stack([masks[0]] * len(masks))
    ours = summarize({"v": evaluate_sequence(masks, pred)})
    base = summarize({"v": evaluate_sequence(masks, frozen)})
    # the object moves 7.6 px a frame, twice its radius over the video: a frozen mask loses it
    # (measured: propagated J 0.83 / F 0.79, frozen J 0.13 / F 0.07)
    assert base["J-Mean"] < 0.35
    assert ours["J-Mean"] > 0.75 and ours["F-Mean"] > 0.7, ours
    assert ours["J&F-Mean"] > base["J&F-Mean"] + 0.5, (ours, base)


def test_frame_size_as_reference():
    assert frame_size(480, 854) == (480, 832)      # DAVIS 480p: longer side floored to a multiple of 64
    assert frame_size(854, 480) == (832, 480)
    assert frame_size(96, 128, 96) == (96, 128)


def _davis(root, frames, masks, name="blob"):
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1] = (200, 30, 30)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text(f"{name}\n")
    for t, (fr, m) in enumerate(zip(frames, masks)):
        jd, ad = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        jd.mkdir(parents=True, exist_ok=True)
        ad.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fr).save(jd / f"{t:05d}.jpg", quality=95)
        im = Image.fromarray(m, mode="P")
        im.putpalette(palette.reshape(-1).tolist())
        im.save(ad / f"{t:05d}.png")
    return palette


def test_videoseg_command(tmp_path, capsys):
    from dino_fast.cli import main
    frames, masks = _moving_object_video(n_frames=8)
    palette = _davis(tmp_path / "DAVIS", frames, masks)
    ck = tmp_path / "ck.pth"
    tiny_vit_checkpoint(ck, patch_size=4)
    out = tmp_path / "out"
    args = ["videoseg", "--checkpoint", str(ck), "--data_path", str(tmp_path / "DAVIS"), "--output_dir", str(out),
            "--short_side", "96", "--size_mask_neighborhood", "4", "--device", "cpu"]
    assert main(args) == 0
    pngs = sorted((out / "blob").iterdir())
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(8)]
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "P" and im.size == (128, 96)
            assert np.array_equal(np.asarray(im.getpalette()[:6]), palette[:2].reshape(-1))
            assert set(np.unique(np.asarray(im))) <= {0, 1}
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"J&F-Mean", "J-Mean", "F-Mean", "J-Recall", "F-Decay", "per_object", "model"}
    assert res["J&F-Mean"] == pytest.approx((res["J-Mean"] + res["F-Mean"]) / 2)
    # even a randomly initialised ViT's patch features track the textured object (measured: J&F 0.76
    # over 10 frames, seeds 0 and 1) far better than the frozen first mask (0.10)
    frozen = summarize({"blob": evaluate_sequence(masks, np.stack([masks[0]] * len(masks)))})
    assert res["J&F-Mean"] > frozen["J&F-Mean"] + 0.4, (res["J&F-Mean"], frozen["J&F-Mean"])
    # the scores are those of the PNGs on disk, evaluated again by --eval_only without a checkpoint
    assert main(["videoseg", "--eval_only", "--data_path", str(tmp_path / "DAVIS"), "--output_dir", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["J-Mean"] == res["J-Mean"] and again["F-Mean"] == res["F-Mean"]
    gt = masks[1:-1]
    pred = np.stack([np.asarray(Image.open(p)) for p in pngs])[1:-1]
    j = np.mean([((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum() for a, b in zip(gt, pred)])
    assert res["J-Mean"] == pytest.approx(j)
    assert "J&F-Mean" in capsys.readouterr().out
    # layout errors name what is missing
    (tmp_path / "DAVIS" / "Annotations" / "480p" / "blob" / "00000.png").unlink()
    assert main(args) == 2
    assert "blob/00000.png: missing" in capsys.readouterr().err
    assert main(args[:3] + ["--data_path", str(tmp_path)]) == 2
    assert "ImageSets/2017/val.txt: missing" in capsys.readouterr().err
