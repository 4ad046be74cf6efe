"""MultiCropLoader behaviour: determinism, sharding over ranks, bad input, pack round trip."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.cli import main as cli_main
from dino_fast.commands.pack import PackError, pack
from dino_fast.pipelines import BadImageError, MultiCropLoader, decode_rgb, open_source
from tests.test_pipeline_sources import SMALL, photo, write_photos

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI not installed"))]


def id_list(tmp_path, n: int) -> str:
    """A file list of n real photos labelled 0..n-1, so labels identify images."""
    paths = write_photos(tmp_path / "imgs", n, size=72)
    lst = tmp_path / "ids.txt"
    lst.write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    return str(lst)


def run_epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    out = list(loader)
    return [c for c, _ in out], torch.cat([lab for _, lab in out]).tolist()


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_crops_other_seed_or_epoch_differs(tmp_path, backend):
    lst = id_list(tmp_path, 6)
    make = lambda seed, workers: MultiCropLoader(lst, batch_size=3, seed=seed, backend=backend,  # noqa: E731
                                                 device="cpu", num_workers=workers, **SMALL)
    a, la = run_epoch(make(5, 1))
    b, lb = run_epoch(make(5, 2))      # worker / thread count does not matter
    assert la == lb
    for ca, cb in zip(a, b):
        for x, y in zip(ca, cb):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    c, lc = run_epoch(make(6, 1))
    d, ld = run_epoch(make(5, 1), epoch=1)
    assert la != lc or any(not torch.equal(x, y) for x, y in zip(a[0], c[0]))
    assert la != ld or any(not torch.equal(x, y) for x, y in zip(a[0], d[0]))


# ---------------------------------------------------------------- sharding
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_cover_the_dataset_once_per_epoch(tmp_path, backend):
    lst = id_list(tmp_path, 12)
    seen_epochs = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = MultiCropLoader(lst, batch_size=3, rank=rank, world_size=2, seed=1, backend=backend,
                                     device="cpu", num_workers=1, **SMALL)
            assert len(loader) == 2
            _, labels = run_epoch(loader, epoch)
            assert len(labels) == 6
            seen.append(labels)
        assert not set(seen[0]) & set(seen[1])                 # disjoint
        assert sorted(seen[0] + seen[1]) == list(range(12))    # together: each image once
        seen_epochs.append(seen[0])
    assert seen_epochs[0] != seen_epochs[1]                    # reshuffled per epoch


def test_uneven_split_drop_last_keeps_ranks_in_step(tmp_path):
    lst = id_list(tmp_path, 7)
    lens = [len(MultiCropLoader(lst, batch_size=1, rank=r, world_size=2, backend="torch", **SMALL))
            for r in (0, 1)]
    assert lens == [3, 3]
    keep = MultiCropLoader(lst, batch_size=2, drop_last=False, backend="torch", num_workers=0, **SMALL)
    assert len(keep) == 4 and sorted(run_epoch(keep)[1]) == list(range(7))


# ---------------------------------------------------------------- bad input
def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = __import__("io").BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _bad_folder(root) -> dict[str, str]:
    """Good photos + one file per bad-input case; returns case -> path."""
    write_photos(root, 4, size=64)
    base = Image.fromarray(photo("astronaut")).resize((80, 60))
    cases = {}
    cases["png"] = str(root / "b_png.png")
    base.save(cases["png"])
    cases["cmyk"] = str(root / "b_cmyk.jpg")
    base.convert("CMYK").save(cases["cmyk"], quality=95)
    cases["gray"] = str(root / "b_gray.jpg")
    base.convert("L").save(cases["gray"], quality=95)
    cases["16bit"] = str(root / "b_16bit.png")
    Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257)).save(cases["16bit"])
    cases["tiny"] = str(root / "b_tiny.png")
    base.resize((5, 4)).save(cases["tiny"])
    cases["corrupt"] = str(root / "b_corrupt.jpg")
    (root / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    cases["truncated"] = str(root / "b_truncated.jpg")
    full = root / "full.tmp"
    base.save(full, format="JPEG", quality=95)
    (root / "b_truncated.jpg").write_bytes(full.read_bytes()[:1500])
    full.unlink()
    cases["empty"] = str(root / "b_empty.jpg")
    (root / "b_empty.jpg").write_bytes(b"")
    cases["garbled"] = str(root / "b_garbled.jpg")     # header and end marker fine, scan data not
    data = bytearray(_jpeg_bytes(base))
    sos = data.find(b"\xff\xda")
    data[sos + 100: len(data) - 100] = np.random.default_rng(0).integers(0, 256, len(data) - sos - 200,
                                                                          dtype=np.uint8).tobytes()
    (root / "b_garbled.jpg").write_bytes(bytes(data))
    return cases


UNREADABLE = ("corrupt", "truncated", "empty", "garbled")


def test_decode_rgb_handles_each_format_like_pil(tmp_path):
    cases = _bad_folder(tmp_path)
    ref = np.asarray(Image.fromarray(photo("astronaut")).resize((80, 60))).astype(int)
    gray_ref = np.asarray(Image.fromarray(photo("astronaut")).resize((80, 60)).convert("L")).astype(int)
    out = {k: np.asarray(decode_rgb(open(p, "rb").read(), p)).astype(int)
           for k, p in cases.items() if k not in UNREADABLE}
    assert all(v.dtype == int and v.shape[-1] == 3 for v in out.values())
    assert np.abs(out["png"] - ref).max() == 0
    assert np.abs(out["cmyk"] - ref).mean() < 6                       # JPEG-lossy CMYK round trip
    assert np.abs(out["16bit"] - gray_ref[..., None]).max() <= 1     # scaled, not clipped to white
    assert (out["gray"][..., 0] == out["gray"][..., 1]).all() and np.abs(out["gray"][..., 0] - gray_ref).mean() < 3
    assert out["tiny"].shape == (4, 5, 3)
    for k in UNREADABLE:
        with pytest.raises(BadImageError, match=os.path.basename(cases[k])):
            decode_rgb(open(cases[k], "rb").read(), cases[k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_skipped_with_named_warning_and_count(tmp_path, backend, caplog):
    cases = _bad_folder(tmp_path)
    n = len(open_source(tmp_path))
    assert n == 4 + len(cases)
    loader = MultiCropLoader(tmp_path, batch_size=n, backend=backend, device="cpu", num_workers=1,
                             shuffle=False, **SMALL)
    with caplog.at_level(logging.WARNING):
        crops, _ = next(iter(loader))
        list(loader)    # full epoch: the end-of-epoch count is logged
    assert all(c.shape[0] == n and torch.isfinite(c).all() for c in crops)
    assert sorted(os.path.basename(s) for s in loader.skipped) == sorted(
        os.path.basename(cases[k]) for k in UNREADABLE)
    text = caplog.text
    for k in UNREADABLE:
        assert os.path.basename(cases[k]) in text
    assert f"skipped {len(UNREADABLE)} bad image(s)" in text
    # handled formats are decoded, not replaced: each appears in the batch as itself
    assert all(os.path.basename(cases[k]) not in text for k in cases if k not in UNREADABLE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UNREADABLE)
def test_on_error_fail_raises_naming_the_file(tmp_path, backend, case):
    write_photos(tmp_path, 2, size=64)
    cases = _bad_folder(tmp_path / "bad")
    lst = tmp_path / "l.txt"
    lst.write_text(f"{tmp_path / 'img_0000.jpg'}\n{cases[case]}\n")
    loader = MultiCropLoader(lst, batch_size=2, backend=backend, device="cpu", num_workers=0,
                             on_error="fail", **SMALL)
    with pytest.raises(Exception, match=os.path.basename(cases[case])):
        list(loader)


# ---------------------------------------------------------------- pack round trip
@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("dali-native", marks=BACKENDS[1].marks)])
def test_pack_then_load_shards_round_trip(tmp_path, backend, capsys):
    backend, _, reader = backend.partition("-")
    paths = write_photos(tmp_path / "src", 9, classes=3, size=64)
    Image.open(paths[0]).save(tmp_path / "src" / "class_0" / "extra.bmp")    # re-encoded as PNG
    (tmp_path / "src" / "class_1" / "broken.jpg").write_bytes(b"not an image")
    src = open_source(tmp_path / "src")
    assert cli_main(["pack", str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "4"]) == 0
    assert "packed 10 images into 3 shard(s)" in capsys.readouterr().out
    shards = sorted(os.listdir(tmp_path / "shards"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard.json"]
    packed = open_source(tmp_path / "shards")
    assert len(packed) == 10 and packed.classes == src.classes == ["class_0", "class_1", "class_2"]
    good = [lab for name, lab in zip(src.names, src.labels) if "broken" not in name]
    assert sorted(packed.labels.tolist()) == sorted(int(x) for x in good)
    shard_list = [str(tmp_path / "shards" / s) for s in shards if s.endswith(".tar")]
    for spec in (tmp_path / "shards", str(tmp_path / "shards" / "shard-*.tar"), shard_list):
        loader = MultiCropLoader(spec, batch_size=5, backend=backend, device="cpu", num_workers=1,
                                 on_error="fail", reader=reader or "host", shuffle=False, **SMALL)
        crops, labels = run_epoch(loader)
        assert sorted(labels) == sorted(int(x) for x in good)
        assert all(c.shape[1:] == (3, 64, 64) for c in crops[0][:2])
    with pytest.raises(PackError, match="--overwrite"):
        pack(tmp_path / "src", str(tmp_path / "shards"), progress=False)


@pytest.mark.skipif(__import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_native_reader_scans_files_up_front(tmp_path):
    """fn.readers.file cannot skip at run time: unreadable files and formats the GPU decoder
    would treat differently (CMYK, 16-bit) are left out before the pipeline starts, by name."""
    cases = _bad_folder(tmp_path)
    header_ok_but_garbled = {"garbled"}          # only a full decode (reader="host") catches it
    left_out = {"corrupt", "truncated", "empty", "cmyk", "16bit"}
    loader = MultiCropLoader(tmp_path, batch_size=2, backend="dali", device="cpu", reader="native",
                             num_workers=1, **SMALL)
    assert sorted(loader.skipped_at_scan) == sorted(cases[k] for k in left_out)
    assert len(loader.source) == 4 + len(cases) - len(left_out)
    assert header_ok_but_garbled <= {k for k in cases if cases[k] in loader.source.names}
    crops, labels = next(iter(loader))
    assert crops[0].shape == (2, 3, 64, 64)
    with pytest.raises(BadImageError):
        MultiCropLoader(tmp_path, batch_size=2, backend="dali", device="cpu", reader="native",
                        on_error="fail", **SMALL)
