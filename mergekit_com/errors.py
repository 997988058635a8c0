"""The base of every error a user fixes by changing their input.

It is a ``click.ClickException`` so that plain ``mergekit-yaml`` (a click
command running in standalone mode) prints it as one ``Error: ...`` line
instead of a traceback; ``mergekit-com`` prints it as
``mergekit-com: error: ...``. It stays a ``ValueError`` for Python callers.
"""

from __future__ import annotations

import click


class MergeInputError(click.ClickException, ValueError):
    """Bad input; the message names the file, model or parameter and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """Whitespace runs become one space; other unprintable characters are escaped.

    Messages quote what users wrote (file names, parameter names), which may
    hold anything, and must still print as exactly one line.
    """
    words = " ".join(str(text).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in words)


def listed(items, limit: int = 5) -> str:
    """``a, b, c and 4 more``: the first ``limit`` items of a list a message names."""
    items = [str(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def first_line(error: BaseException, limit: int = 200) -> str:
    """An error's first line (its type's name if it has no text), cut at a word before
    ``limit`` characters: what a one-line message quotes of an error from a library."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


class ChainConfigError(MergeInputError):
    """A configuration CoM cannot run; the message names what to change."""


class CalibrationError(MergeInputError):
    """A calibration source that cannot be used; the message says what to fix."""


class OutputError(MergeInputError):
    """Where the output goes cannot take it: a full disk, a read-only directory, a busy out_path."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Slurm, Kubernetes), handled like Ctrl-C: the merge stops
    cleanly and the next run continues it."""
