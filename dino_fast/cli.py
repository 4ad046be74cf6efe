"""`dino-fast` command line: a thin dispatcher.

Each subcommand lives in its own module under `dino_fast/commands/` and
exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Only the chosen subcommand's module is imported, so `dino-fast kernels`
never imports DALI and `dino-fast --help` is instant. Every subcommand's
parser is a `dino_fast.flags.Parser` (bare boolean flags, "did you mean"
for unknown options).

Errors the user can fix (dino_fast.errors.user_error_types: bad data, existing
shards, a bad option value, ...) are one line on stderr and exit status 2; the
global flag `--debug` (anywhere on the line) shows their traceback instead.
"""
from __future__ import annotations

import difflib
import logging
import sys
from importlib import import_module

from dino_fast.flags import Parser

# name -> (module, one-line help)
COMMANDS = {
    "train": ("dino_fast.commands.train", "pretrain a ViT with DINO (no arguments: the demo run)"),
    "knn": ("dino_fast.commands.knn", "weighted k-NN evaluation of a checkpoint's features"),
    "linear": ("dino_fast.commands.linear", "linear probe on frozen features"),
    "attention": ("dino_fast.commands.attention", "self-attention maps of the CLS token as PNGs"),
    "retrieval": ("dino_fast.commands.retrieval", "image retrieval: revisited Oxford/Paris mAP, or an ImageFolder"),
    "copydetect": ("dino_fast.commands.copydetect", "copy detection on Copydays (CLS + GeM, whitening, mAP)"),
    "videoseg": ("dino_fast.commands.videoseg", "DAVIS-2017 video segmentation by label propagation (J&F)"),
    "pca": ("dino_fast.commands.pca", "first 3 principal components of patch features as RGB maps"),
    "export": ("dino_fast.commands.export", "export a checkpoint (reference, timm, safetensors)"),
    "bench": ("dino_fast.commands.bench", "benchmark the hot paths against their references"),
    "kernels": ("dino_fast.commands.kernels", "compile every Triton kernel ahead of time, report registers/spills"),
    "pack": ("dino_fast.commands.pack", "pack an image folder into webdataset tar shards"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dino-fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`dino-fast <command> --help` for a command's options; `--debug` (any command): "
              "tracebacks instead of one-line errors."]
    return "\n".join(lines)


def build_parser(name: str):
    """(the subcommand's module, its parser)."""
    module = import_module(COMMANDS[name][0])
    parser = Parser(prog=f"dino-fast {name}", description=module.HELP)
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0] if argv and not argv[0].startswith("-") else "train"
    rest = argv[1:] if argv and argv[0] == name else argv
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"dino-fast: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, parser = build_parser(name)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dino_fast.errors import one_line, user_error_types
    try:
        return int(module.run(args) or 0)
    except Exception as err:
        if debug or not isinstance(err, user_error_types()):
            raise
        print(f"dino-fast {name}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
