"""Input files are untrusted data: only regular files are opened, and never by waiting.

A model folder or a calibration path may hold a FIFO, a socket or a device
(opening a FIFO blocks until someone writes to it; ``/dev/zero`` never
ends), or a symlink into the output being written. These helpers say so in
words before anything reads the path.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Iterator, Optional, Tuple


def file_kind(mode: int) -> Optional[str]:
    """What a path that is neither a regular file nor a directory is, in words."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


def not_regular(path: str) -> Optional[str]:
    """None for a regular file or a directory (symlinks followed), else what it is."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a dangling symlink" if os.path.islink(path) else "missing"
    return file_kind(mode)


class NotRegularFile(OSError):
    """Opened a path that turned out not to be a regular file."""


def open_regular(path: str) -> BinaryIO:
    """Open for reading without ever blocking: a FIFO or device raises instead.

    ``O_NONBLOCK`` makes the open of a FIFO return at once; the check on the
    open file (not the path) leaves no window for a swap in between.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None or stat.S_ISDIR(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is {kind or 'a directory'}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or inside it (both already real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def tree_entries(root: str) -> Iterator[Tuple[str, str]]:
    """(relative name, full path) of every entry under ``root``, without following
    symlinked directories."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(folder, name)
            if name in dirs and not os.path.islink(full):
                continue
            yield os.path.relpath(full, root), full
