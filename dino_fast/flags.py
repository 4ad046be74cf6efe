"""Command-line conventions shared by every `dino-fast` subcommand.

- Boolean flags take the bare form or a value: `--dry_run`, `--dry_run true`,
  `--dry_run=false` (true/false, on/off, yes/no, 1/0, as the reference's
  bool_flag). `add_bool_argument` declares one.
- An unknown option is one line naming the closest valid one and exit status 2:
  `unknown option --epoch; did you mean --epochs?`. Abbreviations are not
  accepted (`--epoch` never silently means `--epochs`).

`Parser` is the `argparse.ArgumentParser` every subcommand gets from
`dino_fast.cli`.
"""
from __future__ import annotations

import argparse
import difflib
import sys

TRUE_WORDS = ("1", "true", "on", "yes")
FALSE_WORDS = ("0", "false", "off", "no")


def bool_value(text: str) -> bool:
    """true/false, on/off, yes/no, 1/0 (any case) -> bool; anything else is an argparse error."""
    low = str(text).lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def mode_value(value, flag: str, modes: tuple[str, ...], true_mode: str):
    """False or one of `modes` from a bool (True: true_mode) or a word (a true / false word, or a
    mode); anything else is a ValueError naming `flag` and the choices."""
    if value is None or value is False:
        return False
    if value is True:
        return true_mode
    low = str(value).lower()
    if low in FALSE_WORDS + ("none", ""):
        return False
    if low in TRUE_WORDS:
        return true_mode
    if low in modes:
        return low
    words = ("false",) + tuple(modes)
    raise ValueError(f"{flag} {value!r}: choose {', '.join(words[:-1])} or {words[-1]} (true means {true_mode})")


def add_bool_argument(parser, name: str, default=False, help: str = "", **kw) -> argparse.Action:
    """`--name` (true), `--name true|false` or `--name=true|false`."""
    return parser.add_argument(name, nargs="?", const=True, default=default, type=bool_value,
                               metavar="true|false", help=help, **kw)


def _is_bool_action(action: argparse.Action) -> bool:
    return action.type is bool_value and action.nargs == "?"


class Parser(argparse.ArgumentParser):
    """ArgumentParser without abbreviations, with bare boolean flags and a
    one-line "did you mean" for unknown options."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _bool_options(self) -> set[str]:
        return {opt for a in self._actions if _is_bool_action(a) for opt in a.option_strings}

    def _normalise(self, argv: list[str]) -> list[str]:
        """In a parser with positional arguments, a bare boolean `--flag` followed by a
        word that is not true/false becomes `--flag true`, so it never swallows the
        positional after it. (Without positionals such a word is a bad value, and
        argparse names the flag.)"""
        if not any(not a.option_strings for a in self._actions):
            return argv
        bools, out = self._bool_options(), []
        for i, tok in enumerate(argv):
            out.append(tok)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if tok in bools and nxt is not None and not nxt.startswith("-") \
                    and nxt.lower() not in TRUE_WORDS + FALSE_WORDS:
                out.append("true")
        return out

    def option_names(self) -> list[str]:
        return [opt for a in self._actions for opt in a.option_strings if opt.startswith("--")]

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        ns, extras = self.parse_known_args(self._normalise(argv), namespace)
        if extras:
            unknown = next((e for e in extras if e.startswith("-")), None)
            if unknown is None:
                self.exit(2, f"{self.prog}: unexpected argument(s) {' '.join(extras)}; see {self.prog} --help\n")
            flag = unknown.split("=", 1)[0]
            close = difflib.get_close_matches(flag, self.option_names(), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
            self.exit(2, f"{self.prog}: unknown option {flag}{hint}\n")
        return ns
