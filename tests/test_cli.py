"""CLI habits of every subcommand: boolean flags bare or with a value, unknown
options answered with the closest name in one line (exit 2), no silent
abbreviations, and `--data_path demo` for the eval commands (the demo's own
train / held-out split, so its k-NN number is reproduced)."""
from __future__ import annotations

import json

import pytest
import torch

from dino_fast import cli


def _parse(command: str, argv: list[str]):
    _, parser = cli.build_parser(command)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- booleans
@pytest.mark.parametrize("argv,expect", [
    (["--dry_run"], True), (["--dry_run", "true"], True), (["--dry_run", "false"], False),
    (["--dry_run=false"], False), (["--dry_run", "0"], False), (["--dry_run", "--epochs", "3"], True),
])
def test_train_bool_flags_bare_or_valued(argv, expect):
    args = _parse("train", argv)
    assert args.dry_run is expect
    assert not hasattr(args, "resume")              # not given: the preset's value stays (suppressed default)
    if "--epochs" in argv:
        assert args.epochs == 3


def test_bare_resume_then_other_flags():
    args = _parse("train", ["--resume", "--stop_on_collapse", "--lr", "0.1"])
    assert args.resume is True and args.stop_on_collapse is True and args.lr == 0.1
    assert _parse("train", ["--resume", "off"]).resume is False


def test_a_bad_bool_value_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("train", ["--resume", "maybe"])
    assert exc.value.code == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("command,argv,attr,expect", [
    ("bench", ["--json"], "json", True), ("bench", ["--json", "false"], "json", False),
    ("bench", [], "smoke", False), ("bench", ["--smoke", "yes"], "smoke", True),
    ("kernels", ["--json"], "json", True), ("kernels", ["--json=0"], "json", False),
    ("pack", ["--overwrite", "src", "dst"], "overwrite", True),
    ("pack", ["src", "dst", "--no-verify"], "no_verify", True),
    ("pack", ["--no-shuffle", "false", "src", "dst"], "no_shuffle", False),
    ("linear", ["--checkpoint", "c", "--data_path", "d", "--avgpool_patchtokens"], "avgpool_patchtokens", True),
    ("linear", ["--checkpoint", "c", "--data_path", "d"], "avgpool_patchtokens", None),
])
def test_every_command_takes_bare_bools(command, argv, attr, expect):
    args = _parse(command, argv)
    assert getattr(args, attr) is expect
    if command == "pack":                            # a bare flag never swallows a positional
        assert (args.src, args.dst) == ("src", "dst")


# --------------------------------------------------------------------------- unknown options
@pytest.mark.parametrize("argv,line", [
    (["train", "--epoch", "3"], "dino-fast train: unknown option --epoch; did you mean --epochs?"),
    (["train", "--dryrun"], "dino-fast train: unknown option --dryrun; did you mean --dry_run?"),
    (["train", "--learning_rate=0.1"], "dino-fast train: unknown option --learning_rate; see dino-fast train --help"),
    (["knn", "--checkpoint", "c", "--data_path", "demo", "--nb_kn", "20"],
     "dino-fast knn: unknown option --nb_kn; did you mean --nb_knn?"),
    (["kernels", "--archs", "sm_90"], "dino-fast kernels: unknown option --archs; did you mean --arch?"),
])
def test_unknown_option_suggests_the_closest_in_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_bare_dry_run_runs_the_plan(capsys):
    assert cli.main(["train", "--dry_run", "--gpu_memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "dry run: vit_tiny/7 student built with" in out and "8.0 GiB" in out


# --------------------------------------------------------------------------- --data_path demo
def test_demo_datasets_are_the_demo_knn_split():
    from dino_fast.eval.data import eval_datasets
    from dino_fast.train.demo import load_demo_arrays
    train, val = eval_datasets("demo")
    d = load_demo_arrays()
    assert (len(train), len(val), len(train.classes)) == (4000, 1000, 10)
    assert train.targets == [int(y) for y in d["y_train"]] and val.targets == [int(y) for y in d["y_test"]]
    x, y = val[7]
    assert x.shape == (3, 28, 28) and y == int(d["y_test"][7])
    # gray -> 3 equal channels, ImageNet-normalised: channel c is (p/255 - mean_c) / std_c
    p = torch.from_numpy(d["x_test"][7]).float() / 255
    torch.testing.assert_close(x[1], (p - 0.456) / 0.224)
    with pytest.raises(ValueError, match="--resize does not apply"):
        eval_datasets("demo", resize=256)


def test_knn_on_demo_reproduces_the_demo_knn(tmp_path, capsys):
    from dino_fast.model import vit_tiny
    from dino_fast.train.demo import knn_top1
    torch.manual_seed(0)
    backbone = vit_tiny(patch_size=7, depth=1)          # one block: the split and the protocol are under test
    ckpt = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), ckpt)
    want = knn_top1(backbone, 28, "cpu")               # what the demo prints (weighted 20-NN, T = 0.07)
    out = tmp_path / "knn.json"
    assert cli.main(["knn", "--checkpoint", str(ckpt), "--data_path", "demo", "--nb_knn", "20",
                     "--num_workers", "0", "--device", "cpu", "--cache_dir", "none", "--output", str(out)]) == 0
    assert "4000 train / 1000 val images, 10 classes" in capsys.readouterr().out
    got = json.loads(out.read_text())["results"]["20"]["top1"]
    assert got == pytest.approx(want, abs=0.11), (got, want)     # 0.1 % = one image of 1,000


def test_linear_on_demo_trains_a_probe(tmp_path, capsys):
    from dino_fast.model import vit_tiny
    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(vit_tiny(patch_size=7, depth=1).state_dict(), ckpt)
    assert cli.main(["linear", "--checkpoint", str(ckpt), "--data_path", "demo", "--epochs", "2",
                     "--n_last_blocks", "1",
                     "--num_workers", "0", "--device", "cpu", "--cache_dir", "none",
                     "--output_dir", str(tmp_path / "probe")]) == 0
    assert "4000 train / 1000 val images, 10 classes" in capsys.readouterr().out
    res = json.loads((tmp_path / "probe" / "linear_probe.json").read_text())
    assert res["top1"] > 10.0 + 5.0      # well above chance (10 classes) after 2 epochs on random features
