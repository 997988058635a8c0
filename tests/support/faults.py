"""Fault injection on every filesystem step of ``mergekit_com.io.fsops``.

``FaultyFS`` wraps each step function; step number ``at`` fails with one of
``FAULTS``: an I/O error, a full disk, a cross-device rename, a busy mount
point, or the process killed there (``Killed``; every later step raises it
too, so nothing after a kill reaches the disk, not even clean-up code).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Dict, List, Optional, Tuple

from mergekit_com.io import fsops

STEPS = ("mkdir", "link", "copy", "rename", "unlink", "rmdir", "fsync_file", "fsync_dir",
         "write_bytes", "save_tensors")
FAULTS = ("error", "ENOSPC", "EXDEV", "EBUSY", "kill")
_ERRNO = {"error": errno.EIO, "ENOSPC": errno.ENOSPC, "EXDEV": errno.EXDEV, "EBUSY": errno.EBUSY}


class Killed(BaseException):
    """The process died at this step."""


class FaultyFS:
    def __init__(self, monkeypatch, at: Optional[int] = None, fault: Optional[str] = None):
        self.at, self.fault = at, fault
        self.steps: List[Tuple[str, str]] = []
        self.dead = False
        for name in STEPS:
            monkeypatch.setattr(fsops, name, self._wrap(name, getattr(fsops, name)))

    def _wrap(self, name, original):
        def step(*args, **kwargs):
            if self.dead:
                raise Killed()
            self.steps.append((name, str(args[0]) if args else ""))
            if len(self.steps) == self.at:
                if self.fault == "kill":
                    self.dead = True
                    raise Killed()
                code = _ERRNO[self.fault]
                raise OSError(code, os.strerror(code), args[1] if name == "save_tensors" else args[0])
            return original(*args, **kwargs)

        return step

    def off(self) -> None:
        """The next run: a new process, no fault."""
        self.at, self.dead = None, False


def snapshot(root: str, skip=()) -> Dict[str, tuple]:
    """Every entry under ``root``: (kind, content hash or link target, inode, mtime)."""
    out = {}
    if not os.path.lexists(root):
        return out
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root)
            if rel.split(os.sep)[0] in skip:
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif not stat.S_ISREG(st.st_mode):  # a FIFO: opening it would wait for a writer
                out[rel] = ("special", st.st_mode, st.st_ino)
            else:
                digest = hashlib.sha256(open(full, "rb").read()).hexdigest()
                out[rel] = ("file", digest, st.st_ino, st.st_mtime_ns)
    return out


def contents(snap: Dict[str, tuple]) -> Dict[str, tuple]:
    """A snapshot without inodes and times: what a reader sees."""
    return {k: v[:2] for k, v in snap.items()}
