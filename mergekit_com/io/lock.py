"""One merge per ``out_path`` at a time: an OS lock (``flock``) on a file next to the work directory.

The kernel drops the lock when its holder exits, however it exits, so a lock
file left by a killed merge never blocks the next one. The file holds who
has the lock (pid, host, start time) for the message the second merge
prints. The holder removes the file before it lets go; a merge that opened
the file just before that checks, once it holds the lock, that the file it
locked is still the one at that path, and tries again if not.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Optional

from mergekit_com.errors import OutputError

LOG = logging.getLogger("mergekit.chain_of_merges.lock")


class OutPathBusy(OutputError):
    """Another merge holds ``out_path``."""


class OutPathLock:
    def __init__(self, path: str, out_path: str):
        self.path, self.out_path = path, out_path
        self.fd: Optional[int] = None

    def __enter__(self) -> "OutPathLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if not (os.path.isdir(self.path) or os.path.islink(self.path)):
                    raise
                raise OutputError(  # ELOOP (a symlink), EISDIR: not a lock this package made
                    f"{self.path} is in the way of out_path {self.out_path}'s lock file ({e.strerror}); "
                    "move it away, then run this again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutPathBusy(
                    f"out_path {self.out_path} is being merged by another process "
                    f"({holder}); wait for it to finish, or stop it, then run this again"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                LOG.warning("%s cannot be locked on this filesystem (%s): make sure no other "
                            "merge writes to %s at the same time", self.path, e.strerror,
                            self.out_path)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed by the holder as it let go: lock the new file
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the message is poorer

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None


def _read(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
