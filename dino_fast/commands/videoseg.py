"""`dino-fast videoseg`: DAVIS-2017 semi-supervised video object
segmentation by label propagation of patch features (the reference
eval_video_segmentation.py), then J, F and J&F as the DAVIS toolkit.

Writes `<output_dir>/<sequence>/<frame>.png` (indexed, the DAVIS palette)
and `<output_dir>/results.json`."""
from __future__ import annotations

from dino_fast.flags import add_bool_argument

import os

HELP = "DAVIS-2017 video object segmentation by label propagation (J, F, J&F)"


def add_arguments(parser) -> None:
    from dino_fast.eval.cli_common import add_checkpoint_args
    add_checkpoint_args(parser)
    g = parser.add_argument_group("video segmentation")
    g.add_argument("--data_path", required=True,
                   help="DAVIS folder: JPEGImages/480p/<seq>/, Annotations/480p/<seq>/, ImageSets/2017/val.txt")
    g.add_argument("--output_dir", default="davis_results", help="masks (one folder per sequence) and results.json")
    g.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt")
    g.add_argument("--sequences", default=None, nargs="+", help="only these sequences (default: the whole split)")
    g.add_argument("--resolution", default="480p", help="DAVIS resolution folder")
    g.add_argument("--n_last_frames", default=7, type=int, help="preceding frames in the context queue (reference: 7)")
    g.add_argument("--size_mask_neighborhood", default=12, type=int,
                   help="sources within this many patches of the target only (0: everywhere; reference: 12)")
    g.add_argument("--topk", default=5, type=int, help="labels from the top k affinities (reference: 5)")
    g.add_argument("--temperature", default=0.1, type=float, help="affinity temperature (reference: 0.1)")
    g.add_argument("--short_side", default=480, type=int,
                   help="frames resized to this shorter side, longer side floored to a multiple of 64 (reference)")
    add_bool_argument(g, "--eval_only", default=False,
                   help="only evaluate the masks already in --output_dir (no --checkpoint needed)")
    for action in parser._actions:  # --checkpoint is needed unless --eval_only (checked in run)
        if action.dest == "checkpoint":
            action.required = False


def _propagate_sequence(args, model, device, seq, bar) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from dino_fast.eval.davis import VOID, davis_palette, read_mask, write_indexed_png
    from dino_fast.eval.dense import last_tokens, patch_size_of
    from dino_fast.eval.videoseg import first_mask_onehot, frame_size, prepare_frame, segment_video, soft_to_labels

    first, palette = read_mask(seq.annotation(seq.frames[0]))
    palette = palette if palette is not None else davis_palette()
    first = np.where(first == VOID, 0, first).astype(np.uint8)
    H, W = first.shape
    size = frame_size(H, W, args.short_side)
    p = patch_size_of(model)
    grid = (size[0] // p, size[1] // p)
    first_seg = first_mask_onehot(first, grid, int(first.max()) + 1).to(device)
    out_dir = os.path.join(args.output_dir, seq.name)
    write_indexed_png(os.path.join(out_dir, os.path.splitext(os.path.basename(seq.frames[0]))[0] + ".png"),
                      first, palette)

    def features():
        for path in seq.frames:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
            x = prepare_frame(rgb, size)[None].to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, patches = last_tokens(model, x)                               # (1, h, w, D)
            bar.update(1)
            yield patches[0].float()
    soft = segment_video(features(), first_seg, n_last_frames=args.n_last_frames, topk=args.topk,
                         temperature=args.temperature, size_mask_neighborhood=args.size_mask_neighborhood)
    for path, seg in zip(seq.frames[1:], soft):
        labels = soft_to_labels(seg, p, (H, W))
        write_indexed_png(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png"), labels, palette)


def _evaluate(args, sequences) -> dict:
    import numpy as np

    from dino_fast.eval.davis import VOID, read_sequence_masks
    from dino_fast.eval.davis_metrics import evaluate_sequence, summarize

    per_seq = {}
    for seq in sequences:
        names = [os.path.splitext(os.path.basename(f))[0] for f in seq.frames]
        gt = read_sequence_masks(seq.annotations, names)
        gt = np.where(gt == VOID, 0, gt)
        res = read_sequence_masks(os.path.join(args.output_dir, seq.name), names)
        if res.shape != gt.shape:
            raise ValueError(f"{os.path.join(args.output_dir, seq.name)}: masks of {res.shape[1:]} px where the "
                             f"annotations are {gt.shape[1:]}")
        per_seq[seq.name] = evaluate_sequence(gt, res)
    summary = summarize(per_seq)
    summary["sequences"] = {n: {"J": [s[0] for s in r["J"]], "F": [s[0] for s in r["F"]]} for n, r in per_seq.items()}
    return summary


def run(args) -> int:
    from tqdm import tqdm

    from dino_fast.eval.cli_common import USER_ERRORS, fail, pick_device
    from dino_fast.eval.davis import load_davis
    from dino_fast.eval.io import atomic_write_json
    from dino_fast.eval.load import load_with_config

    try:
        if args.topk < 1 or args.temperature <= 0 or args.n_last_frames < 0 or args.size_mask_neighborhood < 0:
            raise ValueError("--topk must be >= 1, --temperature > 0, --n_last_frames and "
                             "--size_mask_neighborhood >= 0")
        if not args.eval_only and not args.checkpoint:
            raise ValueError("--checkpoint is required (unless --eval_only evaluates existing masks)")
        sequences = load_davis(args.data_path, args.split, args.resolution, sequences=args.sequences)
        meta = {}
        if not args.eval_only:
            device = pick_device(args.device)
            model, cfg = load_with_config(args.checkpoint, args.checkpoint_key, arch=args.arch,
                                          patch_size=args.patch_size, attention=args.attention, device=device)
            meta = {"checkpoint": args.checkpoint, "checkpoint_key": args.checkpoint_key, "model": cfg.to_dict()}
            n_frames = sum(len(s.frames) for s in sequences)
            print(f"{args.checkpoint}: {cfg.name} ({args.checkpoint_key}), device {device}; {len(sequences)} "
                  f"sequences, {n_frames} frames -> {args.output_dir}")
            with tqdm(total=n_frames, desc="label propagation", unit="frame", dynamic_ncols=True) as bar:
                for seq in sequences:
                    bar.set_postfix_str(seq.name)
                    _propagate_sequence(args, model, device, seq, bar)
        summary = _evaluate(args, sequences)
    except USER_ERRORS as e:
        return fail("videoseg", e)
    print(f"{'J&F-Mean':>9} {'J-Mean':>7} {'J-Recall':>8} {'J-Decay':>7} {'F-Mean':>7} {'F-Recall':>8} {'F-Decay':>7}")
    print(f"{summary['J&F-Mean']:>9.3f} {summary['J-Mean']:>7.3f} {summary['J-Recall']:>8.3f} {summary['J-Decay']:>7.3f} "
          f"{summary['F-Mean']:>7.3f} {summary['F-Recall']:>8.3f} {summary['F-Decay']:>7.3f}")
    out = {**meta, "data_path": args.data_path, "split": args.split, "n_last_frames": args.n_last_frames,
           "size_mask_neighborhood": args.size_mask_neighborhood, "topk": args.topk, "temperature": args.temperature,
           **summary}
    path = atomic_write_json(out, os.path.join(args.output_dir, "results.json"))
    print(f"masks in {args.output_dir}/<sequence>/, results written to {path}")
    return 0
