"""Every filesystem step that changes something: one small function per kind.

Publishing, the work directory and the layer checkpoints change files only
through these, so that ``tests/io/test_faults.py`` can enumerate every step
of a publish or a resume and make each one fail (an error, a full disk, a
cross-device rename, a busy mount point, or the process killed there).
Nothing here decides what may be removed: callers pass only paths this
package created.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Dict

import torch


def mkdir(path: str) -> None:
    os.mkdir(path)


def link(src: str, dst: str) -> None:
    os.link(src, dst, follow_symlinks=False)


def copy(src: str, dst: str) -> None:
    """Content and times (so the copy stats like the original), then fsync."""
    shutil.copy2(src, dst, follow_symlinks=False)
    fsync_file(dst)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def unlink(path: str) -> None:
    os.unlink(path)


def rmdir(path: str) -> None:
    os.rmdir(path)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """A rename or creation is durable once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the data was synced
    finally:
        os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
    """A new file (never through a symlink), written and synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


# ------------------------------------------------------------------ composed steps


def write_atomic(path: str, data: bytes) -> None:
    """``path`` holds either its old content or ``data``, after any crash."""
    tmp = path + ".tmp"
    write_bytes(tmp, data)
    rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def remove_tree(path: str) -> None:
    """Remove a tree this package created, without crossing into another filesystem.

    Symlinks are removed, never followed; a directory on another device
    (something mounted inside) is left in place with everything in it, and so
    are the directories holding it.
    """
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        unlink(path)
        return
    _remove_dir(path, top.st_dev)


def _remove_dir(path: str, device: int) -> bool:
    """True when ``path`` is gone; False when something mounted is kept under it."""
    emptied = True
    for entry in os.scandir(path):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != device:
                emptied = False  # a mount point: never step into it
            elif not _remove_dir(entry.path, device):
                emptied = False
        else:
            unlink(entry.path)
    if emptied:
        rmdir(path)
    return emptied


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows (no second copy of big files), else a copy."""
    try:
        link(src, dst)
    except OSError:
        copy(src, dst)

