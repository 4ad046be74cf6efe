"""`dino-fast pack SRC DST`: pack an image folder into webdataset tar shards.

SRC is anything `MultiCropLoader` reads (ImageFolder tree, flat folder, .txt
list). Each sample becomes `<key>.jpg|png` + `<key>.cls` (the label, when
labelled): 8-bit RGB / grayscale JPEG and PNG keep their bytes; CMYK, 16-bit,
palette, alpha and other formats become 8-bit RGB PNG as the PIL path would
convert them, so any reader (DALI's included) decodes every member. N samples
per shard, named DST/<prefix>-000000.tar ...; DST/<prefix>.json lists the class
names and counts. Every shard is written to a temporary name and renamed
when complete, so an interrupted run never leaves a truncated shard behind.
Every image is decoded once to verify it (so loaders can read the shards with
validate="header"); bad images are skipped with a warning (or abort with
--on-error fail). A pack that stops (a bad image with --on-error fail, an
error, Ctrl-C) removes the shards it wrote: shards without their <prefix>.json
are an incomplete set. Errors the user can fix are `PackError` (one line from
the command line, exit status 2).
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
import time

from dino_fast.errors import UserError

HELP = "pack an image folder into webdataset tar shards"
log = logging.getLogger("dino_fast.pack")


class PackError(UserError):
    """A pack that cannot run or complete; the message names the file or flag and the fix."""


def add_arguments(parser) -> None:
    from dino_fast.flags import add_bool_argument
    parser.add_argument("src", help="ImageFolder tree, flat image folder or .txt file list")
    parser.add_argument("dst", help="output folder for the .tar shards (created)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed: shards mix classes (default 0)")
    add_bool_argument(parser, "--no-shuffle", help="keep the source order")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                        help="bad image: skip it with a warning (default) or stop")
    add_bool_argument(parser, "--overwrite", help="replace existing shards in DST")
    add_bool_argument(parser, "--no-verify",
                      help="skip the full decode of every image (faster; corrupt data may get packed)")


def _member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def _encoded(data: bytes, name: str, verify: bool = True) -> tuple[bytes, str]:
    """(bytes, ext) ready for a shard: 8-bit JPEG/PNG as they are, the rest as RGB PNG.
    `verify` decodes every image fully once (garbled JPEG data passes a header check)."""
    from dino_fast.pipelines.images import decode_rgb, inspect_encoded, verify_decodes
    info = inspect_encoded(data, name)
    if verify:
        verify_decodes(data, name)
    if info.gpu_decodable:              # 8-bit RGB / gray JPEG or PNG: the original bytes
        return data, "jpg" if info.format == "JPEG" else "png"
    buf = io.BytesIO()
    decode_rgb(data, name).save(buf, format="PNG")
    return buf.getvalue(), "png"


def pack(src, dst: str, shard_size: int = 1000, prefix: str = "shard", seed: int | None = 0,
         on_error: str = "skip", overwrite: bool = False, progress: bool = True,
         verify: bool = True) -> dict:
    """Pack `src` into shards under `dst`; returns the summary written to <prefix>.json."""
    import numpy as np
    from tqdm import tqdm

    from dino_fast.io import atomic_write_json
    from dino_fast.pipelines.images import BadImageError
    from dino_fast.pipelines.sources import open_source
    if shard_size < 1:
        raise PackError(f"--shard-size {shard_size}: must be >= 1 (images per shard)")
    source = open_source(src)
    if not source.encoded:
        raise PackError("pack reads files; an in-memory ArraySource has nothing to pack")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise PackError(f"{dst}: DST exists and is not a folder; choose another DST")
    created = not os.path.exists(dst)
    os.makedirs(dst, exist_ok=True)
    existing = sorted(f for f in os.listdir(dst) if f.startswith(prefix + "-") and f.endswith(".tar"))
    if existing and not overwrite:
        raise PackError(f"{dst} already holds {len(existing)} '{prefix}-*.tar' shards; "
                        "pass --overwrite or choose another DST / --prefix")
    meta = os.path.join(dst, f"{prefix}.json")
    for path in [os.path.join(dst, f) for f in existing] + ([meta] if existing and os.path.exists(meta) else []):
        os.remove(path)
    order = np.arange(len(source)) if seed is None else np.random.default_rng(seed).permutation(len(source))
    shards, skipped, count, mtime = [], [], 0, time.time()
    tar, tmp_path = None, None

    def close():
        nonlocal tar
        tar.close()
        final = tmp_path[: -len(".tmp")]
        os.replace(tmp_path, final)
        shards.append(os.path.basename(final))
        tar = None

    try:
        for i in tqdm(order, desc=f"pack {src}", unit="img", disable=not progress):
            i = int(i)
            try:
                data, ext = _encoded(source.read(i), source.name(i), verify)
            except (BadImageError, OSError) as err:
                if on_error == "fail":
                    raise PackError(f"{' '.join(str(err).split())}; stopped by --on-error fail (no shards "
                                    "kept): fix or remove the file, or pass --on-error skip") from err
                log.warning("skipping bad image: %s", err)
                skipped.append(source.name(i))
                continue
            if tar is None:
                tmp_path = os.path.join(dst, f"{prefix}-{len(shards):06d}.tar.tmp")
                tar = tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT)
            key = f"{count:09d}"
            _member(tar, f"{key}.{ext}", data, mtime)
            if source.labels[i] >= 0:
                _member(tar, f"{key}.cls", str(int(source.labels[i])).encode(), mtime)
            count += 1
            if count % shard_size == 0:
                close()
        if tar is not None:
            close()
        if count == 0:
            raise PackError(f"{src}: every image was unreadable ({len(skipped)} skipped, e.g. "
                            f"{skipped[0] if skipped else '-'}); nothing packed")
        summary = {"source": str(src), "images": count, "skipped": skipped, "shards": shards,
                   "shard_size": shard_size, "classes": source.classes}
        atomic_write_json(summary, meta, sort_keys=False)
    except BaseException:
        _remove_partial(dst, tar, tmp_path, shards)
        if created and not os.listdir(dst):
            os.rmdir(dst)
        raise
    return summary


def _remove_partial(dst: str, tar, tmp_path: str | None, shards: list[str]) -> None:
    """After a failed pack: the open temporary shard and the shards this run completed."""
    if tar is not None:
        tar.close()
    for path in ([tmp_path] if tmp_path else []) + [os.path.join(dst, s) for s in shards]:
        if os.path.exists(path):
            os.remove(path)
    if shards:
        log.warning("pack stopped: removed the %d shard(s) it had written to %s", len(shards), dst)


def run(args) -> int:
    summary = pack(args.src, args.dst, shard_size=args.shard_size, prefix=args.prefix,
                   seed=None if args.no_shuffle else args.seed, on_error=args.on_error,
                   overwrite=args.overwrite, verify=not args.no_verify)
    print(f"packed {summary['images']} images into {len(summary['shards'])} shard(s) in {args.dst}"
          + (f"; skipped {len(summary['skipped'])} bad file(s), e.g. {summary['skipped'][0]}"
             if summary["skipped"] else ""))
    return 0
