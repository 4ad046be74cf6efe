"""The step's speed options: their values, their command-line flags and their checks.

    --compile false|blocks|model           torch.compile nothing, each transformer block, or the
                                           whole student and teacher (true = model, the old flag)
    --activation_checkpointing false|full|selective   (true = full, the old flag; checkpointing.py)
    --fused_optimizer true|false           AdamW(fused=True) (optim.build_optimizer)
    --efficient_drop_path true|false       stochastic depth on the kept rows only (drop_path.py)
    --cuda_graph_teacher true|false        the teacher's blocks compiled with CUDA graphs (compile.py)

The mode flags take a bare form too (`--compile` = model, `--activation_checkpointing` = full),
so every command line written for the boolean flags keeps its meaning.
"""
from __future__ import annotations

import argparse

from dino_fast.flags import mode_value
from dino_fast.model.checkpointing import checkpoint_mode

COMPILE_MODES = (False, "blocks", "model")
CHECKPOINT_MODES = (False, "full", "selective")


def compile_mode(value) -> bool | str:
    """False | "blocks" | "model" from a bool (True = model, as the old flag) or a word."""
    return mode_value(value, "--compile", ("blocks", "model"), "model")


MODE_FIELDS = {  # field -> (parser of a value, the words shown in --help)
    "compile": (compile_mode, "false|blocks|model"),
    "activation_checkpointing": (checkpoint_mode, "false|full|selective"),
}


def add_mode_argument(parser, field: str, help: str = "", default=argparse.SUPPRESS) -> argparse.Action:
    """`--field` (bare: true), `--field WORD`; the value is parsed by MODE_FIELDS[field]."""
    parse, metavar = MODE_FIELDS[field]

    def value(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    value.__name__ = field  # argparse names the type in its messages
    return parser.add_argument(f"--{field}", nargs="?", const=parse(True), default=default, type=value,
                               metavar=metavar, help=help)


def normalize(cfg) -> None:
    """The mode fields of `cfg` as their canonical values (False or a mode word), in place.
    Raises ValueError with the flag's name for a word that is not a mode."""
    cfg.compile = compile_mode(cfg.compile)
    cfg.activation_checkpointing = checkpoint_mode(cfg.activation_checkpointing)

