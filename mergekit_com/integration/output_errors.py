"""What stops a merge from outside its inputs, as one line: a full disk, a read-only
directory, SIGTERM. Each says what to do, and whether the work so far is kept."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import threading
import types
from typing import Iterator, Optional

from mergekit_com.errors import MergeInputError, OutputError, Terminated
from mergekit_com.io.workdir import WorkDir

LOG = logging.getLogger("mergekit_com.integration.output_errors")

# safetensors reports an I/O error as text: "... Os { code: 28, kind: StorageFull ... }"
_FULL = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b|code: (28|122)\b")
# ... and a file past the size limit (ulimit -f, FAT32's 4 GiB) as "File too large (os error 27)"
_TOO_LARGE = re.compile(r"File too large|os error 27\b|code: 27\b")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _os_error(error: BaseException, codes, text: re.Pattern) -> Optional[BaseException]:
    """The error in ``error``'s chain with one of the errno ``codes`` (or, from a library
    that reports it as text, matching ``text``)."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in codes:
            return e
        if not isinstance(e, OSError) and text.search(str(e)):
            return e
    return None


def _not_writable(error: BaseException, work: WorkDir) -> Optional[OSError]:
    """A permission error on the way to the work directory or out_path."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            name = os.path.abspath(str(e.filename or ""))
            if any(p == name or p.startswith(name + os.sep) or name.startswith(p + os.sep)
                   for p in (os.path.dirname(work.path), work.target)):
                return e
    return None


def _progress(work: Optional[WorkDir]) -> Optional[str]:
    if work is None or not os.path.isdir(work.path):
        return None
    if work.is_complete():
        return "complete"
    done = work.checkpoints.completed_layers(verify=False)
    return f"{done} layer(s) merged" if done else None


@contextlib.contextmanager
def output_errors(work: WorkDir):
    """Turns a full disk or a read-only out_path directory into one line.

    The caller sets ``.work`` on the yielded object once the work directory is
    open, so that the message can say what is kept.
    """
    state = types.SimpleNamespace(work=None)
    try:
        yield state
    except MergeInputError:
        raise
    except BaseException as e:
        kept = _progress(state.work)
        resume = f"; the merge so far ({kept}) is kept in {work.path}" if kept else ""
        if _os_error(e, (errno.ENOSPC, errno.EDQUOT), _FULL) is not None:
            raise OutputError(
                f"no space left on the device of out_path {work.shown}; free some space and "
                f"run the same command again{resume}"
            ) from None
        if _os_error(e, (errno.EFBIG,), _TOO_LARGE) is not None:
            raise OutputError(
                f"a file of the merge is larger than out_path {work.shown}'s filesystem or the "
                "file size limit (ulimit -f) allows; lower --out-shard-size or choose another "
                "filesystem (activations past their budget go to the temporary directory, "
                f"TMPDIR), then run the same command again{resume}"
            ) from None
        denied = _not_writable(e, work)
        if denied is not None:
            name = os.path.abspath(str(denied.filename or ""))
            if name == work.target or name.startswith(work.target + os.sep):
                raise OutputError(
                    f"out_path {work.shown} cannot be written: it is not writable "
                    f"({denied.strerror}); make it writable or choose another out_path, then "
                    f"run the same command again{resume}"
                ) from None
            where = os.path.dirname(work.shown.rstrip(os.sep)) or "."
            raise OutputError(
                f"out_path {work.shown} cannot be written: its directory {where} is not "
                f"writable ({denied.strerror}); choose an out_path in a directory you can write "
                f"to{resume}"
            ) from None
        if kept:
            LOG.warning("merge stopped; %s holds its progress (%s): run the same command again "
                        "(mergekit-com: add --resume) to continue", work.path, kept)
        raise


@contextlib.contextmanager
def stop_signals():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
