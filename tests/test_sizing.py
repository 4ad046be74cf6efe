"""Your own folder without a preset: sizes chosen for the machine and the data (the `small`
preset on a CPU or for a small dataset, the reference defaults for a large one on a GPU, a batch
that fits a tiny folder), said in one message; the dry run states the checkpoint size, and that
size is the size of the checkpoint a run writes."""
from __future__ import annotations

import os
import tarfile

import pytest

from dino_fast import cli
from dino_fast.train.presets import PRESETS, resolve
from dino_fast.train.sizing import LARGE, checkpoint_bytes, choose_sizes, count_images
from tests.test_pipeline_sources import write_photos


def _list(tmp_path, n: int) -> str:
    path = tmp_path / f"list{n}.txt"
    path.write_text("# a comment\n\n" + "".join(f"img_{i}.jpg\n" for i in range(n)))
    return str(path)


# ---------------------------------------------------------------- counting
def test_count_images_folders_lists_and_shards(tmp_path):
    write_photos(tmp_path / "tree", 7, classes=3, size=32)
    (tmp_path / "tree" / "class_0" / "notes.txt").write_text("not an image")
    (tmp_path / "tree" / ".hidden").mkdir()
    (tmp_path / "tree" / ".hidden" / "x.jpg").write_bytes(b"")      # dot folders are not read
    assert count_images(str(tmp_path / "tree")) == 7
    assert count_images(_list(tmp_path, 12)) == 12                   # comments and blank lines skipped
    assert count_images(_list(tmp_path, 30), limit=10) == 10         # counting stops at the limit
    from dino_fast.commands.pack import pack
    pack(tmp_path / "tree", str(tmp_path / "shards"), shard_size=3, progress=False)
    os.remove(tmp_path / "tree" / "class_0" / "notes.txt")
    assert count_images(str(tmp_path / "shards")) == 7               # from shard.json
    assert count_images(str(tmp_path / "shards" / "shard-*.tar")) == 7
    os.remove(tmp_path / "shards" / "shard.json")
    assert count_images(str(tmp_path / "shards")) == 7               # from the tar members
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        assert sum(m.name.endswith((".jpg", ".png")) for m in tar) == 3
    assert count_images(str(tmp_path / "nope")) is None


# ---------------------------------------------------------------- the choice
def test_cpu_picks_the_small_preset_and_says_how_to_override(tmp_path):
    data = _list(tmp_path, 3000)
    preset, overrides, msg = choose_sizes(None, {"data_path": data}, world_size=1, gpu=None)
    assert preset == "small" and overrides == {"data_path": data}     # 3000 images: batch 32 fits
    assert msg.startswith("no --preset: 3000 images on the CPU -> preset small (ViT-tiny/16")
    assert "--preset vit_s16_in1k" in msg and "--<field> to override" in msg
    cfg = resolve(preset, overrides)
    assert (cfg.arch, cfg.patch_size, cfg.out_dim, cfg.global_size, cfg.batch_size_per_gpu, cfg.saveckp_freq) == \
        ("vit_tiny", 16, 4096, 128, 32, 0)


def test_gpu_small_data_small_preset_large_data_reference_defaults(tmp_path):
    gpu = "NVIDIA L4, 22 GB"
    preset, _, msg = choose_sizes(None, {"data_path": _list(tmp_path, 5000)}, world_size=1, gpu=gpu)
    assert preset == "small" and "5000 images on the GPU (NVIDIA L4, 22 GB) -> preset small" in msg
    big = _list(tmp_path, LARGE + 5)
    preset, overrides, msg = choose_sizes(None, {"data_path": big}, world_size=8, gpu=gpu)
    assert preset is None and overrides == {"data_path": big}
    assert f"{LARGE}+ images" in msg and "reference ImageNet defaults" in msg and "--dry_run" in msg
    assert resolve(preset, overrides).out_dim == 65536


def test_a_tiny_folder_gets_a_batch_that_fits(tmp_path):
    """24 images (the ImageNet default batch 64 would not run one step): 4 steps of 4 images."""
    preset, overrides, msg = choose_sizes(None, {"data_path": _list(tmp_path, 24)}, world_size=1, gpu=None)
    assert overrides["batch_size_per_gpu"] == 4 and "batch 4 per process for 24 images" in msg
    _, overrides, _ = choose_sizes(None, {"data_path": _list(tmp_path, 24)}, world_size=2, gpu=None)
    assert overrides["batch_size_per_gpu"] == 2                      # 12 per process
    _, overrides, _ = choose_sizes(None, {"data_path": _list(tmp_path, 24), "batch_size_per_gpu": 16},
                                   world_size=1, gpu=None)
    assert overrides["batch_size_per_gpu"] == 16                     # given: kept (the loader names it if too big)


def test_an_empty_folder_gets_no_sizing_message(tmp_path):
    (tmp_path / "empty").mkdir()
    assert choose_sizes(None, {"data_path": str(tmp_path / "empty")}, world_size=1, gpu=None)[2] is None


@pytest.mark.parametrize("preset,overrides", [("vit_s16_in1k", {"data_path": "x"}), (None, {}),
                                              ("small", {"data_path": "x"}), (None, {"data_path": "demo"})])
def test_no_choice_with_a_preset_or_without_data(preset, overrides):
    assert choose_sizes(preset, overrides, world_size=1, gpu=None) == (preset, overrides, None)


def test_flags_given_win_over_the_chosen_preset(tmp_path):
    preset, overrides, msg = choose_sizes(None, {"data_path": _list(tmp_path, 3000), "arch": "vit_small",
                                                 "epochs": 7}, world_size=1, gpu=None)
    cfg = resolve(preset, overrides)
    assert (cfg.arch, cfg.epochs, cfg.out_dim) == ("vit_small", 7, PRESETS["small"]["out_dim"])
    assert cfg.warmup_epochs == 0                                     # a tenth of 7 epochs: the preset's 10 cannot be
    assert "your --arch --epochs kept" in msg


# ---------------------------------------------------------------- the command and the checkpoint size
def test_dry_run_prints_the_choice_and_the_checkpoint_size(tmp_path, capsys):
    write_photos(tmp_path / "mine", 6, size=40)
    assert cli.main(["train", "--data_path", str(tmp_path / "mine"), "--device", "cpu", "--dry_run"]) == 0
    cap = capsys.readouterr()
    assert "no --preset: 6 images on the CPU -> preset small" in cap.err
    line = [ln for ln in cap.out.splitlines() if ln.startswith("checkpoint:")]
    assert line == ["checkpoint: 129 MB per save (student + teacher + adamw state, fp32), checkpoint.pth only "
                    "(--saveckp_freq 0)"]
    assert not os.path.exists(tmp_path / "mine" / "config.json")


def test_checkpoint_size_matches_the_file_a_run_writes(tmp_path):
    """The formula against os.path.getsize of a real checkpoint.pth (one step, freeze_last_layer 0 so
    every parameter has its AdamW state)."""
    import torch

    from dino_fast.train.build import build_network
    from dino_fast.train.loop import train
    write_photos(tmp_path / "mine", 4, size=40)
    cfg = resolve("small", dict(data_path=str(tmp_path / "mine"), output_dir=str(tmp_path / "run"), device="cpu",
                                depth=1, out_dim=2048, global_size=32, local_size=16, local_crops_number=1,
                                batch_size_per_gpu=4, epochs=1, warmup_epochs=0, freeze_last_layer=0,
                                num_workers=0, knn_eval=False, saveckp_freq=1))
    train(cfg)
    with torch.device("meta"):
        student = build_network(cfg, student=True)
    want = checkpoint_bytes(student, cfg.optimizer)
    for name in ("checkpoint.pth", "checkpoint0000.pth"):
        got = os.path.getsize(tmp_path / "run" / name)
        assert abs(got - want) / got < 0.01, (name, got, want)
