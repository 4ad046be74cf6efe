"""Errors the user causes and can fix, and how the command line reports them.

`UserError` is the one exception type for input that cannot work: a missing or
empty data folder, a batch larger than the dataset, existing shards, a bad
option value. Its message is one line that names the file or flag and the
fix. `dino-fast` (dino_fast/cli.py) prints it as `dino-fast <command>: error:
<message>` and exits with status 2; the traceback is shown only with the
global `--debug` flag.

Packages that must not import dino_fast's trainer code keep their own error
classes (dino_fast.pipelines: `SourceError`, `PipelineError`, `BadImageError`; dino_fast.eval:
`CheckpointError`); `user_error_types()` collects them with `UserError` so the
command line catches them all, without importing a module (and torch) only
to name its error class: an error class whose module was never imported
cannot have been raised.
"""
from __future__ import annotations

import sys


class UserError(Exception):
    """Input that cannot work; the message names the file or flag and the fix (one line)."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the argument and the fix
    (raised by dino_fast.train.config.validate and the method checks it calls)."""


# errors of modules that stay independent of this one: (module, class name)
_ELSEWHERE = (("dino_fast.pipelines.sources", "SourceError"),
              ("dino_fast.pipelines.loader", "PipelineError"),
              ("dino_fast.pipelines.images", "BadImageError"),
              ("dino_fast.eval.load", "CheckpointError"))


def user_error_types() -> tuple[type[BaseException], ...]:
    """UserError and the user-input errors of the modules imported so far."""
    types: list[type[BaseException]] = [UserError]
    for module, name in _ELSEWHERE:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes repr adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(msg).split()) or type(err).__name__
