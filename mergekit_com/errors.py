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
        # One line: a message is shown as-is by click and by mergekit-com.
        super().__init__(" ".join(str(message).split()))
