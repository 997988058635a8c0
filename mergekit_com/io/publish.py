"""Publishing a finished model to ``out_path`` without losing or mixing anything.

Two ways, by what is there:

* ``out_path`` does not exist: the staged folder is renamed to it, one atomic
  step (if the work directory is on another filesystem, it is first copied
  next to ``out_path`` under a hidden name, then renamed).
* ``out_path`` is a directory (empty, a previous merge, a mount point, the
  target of a symlink): the model is published *into* it, since a mount
  point cannot be renamed and a directory someone else made is not ours to
  replace. The new files are brought next to their final place (hard links,
  or copies across filesystems) in ``out_path/.com-publish/``; a journal
  names the files to install and the earlier merge's files to remove; our
  old files are moved into the transaction folder, the new ones renamed in,
  and renaming the journal to ``committed.json`` is the commit. Any fault
  before that rolls back (at once, or at the start of the next run after a
  kill); after it, the next run only removes the old files.

Files this package did not write are never moved, replaced or removed:
``.mergekit-com.json`` in ``out_path`` lists the files a merge published
(with sizes and modification times); anything else, or a listed file
changed since, belongs to someone else. If such a file would be replaced by
the merged model, or be loaded along with it (weights, index, config,
tokenizer), the merge is refused before any work (``blocking_files``).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import logging
import stat
from typing import Dict, Iterable, List, Set, Tuple

from mergekit_com.io import fsops

LOG = logging.getLogger("mergekit.chain_of_merges.publish")

MARKER = ".mergekit-com.json"
TRANSACTION = ".com-publish"
DONE = ".com-publish.done"  # a finished transaction, being removed
JOURNAL, COMMITTED = "journal.json", "committed.json"

# Names a transformers model folder is read by: a file of someone else's with one of
# these names would be replaced by the merge, or load along with it as a stale mix.
MODEL_FILES = (
    "config.json", "generation_config.json", "README.md", "mergekit_config.yml",
    "com_report.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json",
    "preprocessor_config.json", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf",
    "*.h5", "*.msgpack", "*.index.json", "*.py", "*.jinja", "*.model", "*.tiktoken",
)

# rename(2) cannot move this: another filesystem, a mount point, or a filesystem that says no
CANNOT_RENAME = (errno.EXDEV, errno.EBUSY, errno.EPERM, errno.ENOTSUP, errno.EACCES)


def _transaction_like(path: str) -> bool:
    """Whether ``path`` is shaped like a publish transaction of ours (only new/, old/ and
    the journal in it): a folder of someone else's with that name is never touched."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return set(os.listdir(path)) <= {"new", "old", JOURNAL, COMMITTED, JOURNAL + ".tmp"}
    except OSError:
        return False


def loads_with_model(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES)


def _stamp(path: str) -> List[int]:
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_marker(folder: str) -> Dict[str, List[int]]:
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as fp:
            files = json.load(fp)["files"]
        return {str(k): list(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def published_files(folder: str) -> List[str]:
    """The files the last merge published in ``folder`` (its marker's list), sorted."""
    return sorted(_read_marker(folder))


def inventory(folder: str, ignore: Iterable[str] = ()) -> Tuple[Set[str], List[str]]:
    """(our files, everyone else's entries) in ``folder``, leaving out ``ignore``."""
    listed = _read_marker(folder)
    ours, foreign = set(), []
    skip = {MARKER, *ignore}
    skip.update(n for n in (TRANSACTION, DONE) if _transaction_like(os.path.join(folder, n)))
    for name in sorted(os.listdir(folder)):
        if name in skip:
            continue
        full = os.path.join(folder, name)
        regular = stat.S_ISREG(os.lstat(full).st_mode)
        if regular and listed.get(name) == _stamp(full):
            ours.add(name)
        else:
            foreign.append(name)
    return ours, foreign


def blocking_files(folder: str, ignore: Iterable[str] = ()) -> List[str]:
    """Someone else's entries in ``folder`` that the merged model would replace or load with."""
    if not os.path.isdir(folder):
        return []
    return [n for n in inventory(folder, ignore)[1]
            if loads_with_model(n) or n in (TRANSACTION, DONE)]


class PublishBlocked(Exception):
    """Someone else's file is where the merged model goes."""

    def __init__(self, names: List[str]):
        super().__init__(", ".join(names))
        self.names = names


def marker_bytes(folder: str, names: Iterable[str]) -> bytes:
    files = {n: _stamp(os.path.join(folder, n)) for n in names}
    return json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True).encode()


def sync_tree(folder: str) -> None:
    """Everything staged reaches the disk before it is published."""
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if os.path.isfile(full) and not os.path.islink(full):
            fsops.fsync_file(full)
    fsops.fsync_dir(folder)


def publish(staged: str, target: str, ignore: Iterable[str] = ()) -> None:
    """Make ``target`` hold exactly the staged model (and whatever else was not ours)."""
    sync_tree(staged)
    if os.path.isdir(target):
        _publish_into(staged, target, list(ignore))
    else:
        _publish_new(staged, target)


# ------------------------------------------------------------------ a new out_path


def _publish_new(staged: str, target: str) -> None:
    names = sorted(os.listdir(staged))
    fsops.write_atomic(os.path.join(staged, MARKER), marker_bytes(staged, names))
    try:
        fsops.rename(staged, target)
    except OSError as e:
        if e.errno not in CANNOT_RENAME:
            raise
        _copy_then_rename(staged, target, names)
    fsops.fsync_dir(os.path.dirname(target))


def _copy_then_rename(staged: str, target: str, names: List[str]) -> None:
    """The work directory is on another filesystem: copy next to ``target``, then rename."""
    copy = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{TRANSACTION}")
    fsops.remove_tree(copy)  # an earlier attempt's partial copy: ours, and never reused
    try:
        fsops.mkdir(copy)
        for name in names:
            fsops.copy(os.path.join(staged, name), os.path.join(copy, name))
        fsops.write_atomic(os.path.join(copy, MARKER), marker_bytes(copy, names))
        fsops.rename(copy, target)
    except BaseException:
        fsops.remove_tree(copy)
        raise


# ------------------------------------------------------------------ into an existing out_path


def _publish_into(staged: str, target: str, ignore: List[str]) -> None:
    recover(target)
    names = sorted(os.listdir(staged))
    ours, foreign = inventory(target, ignore)
    # after recover(), an entry of either name is someone else's: the transaction needs both
    clash = [n for n in names if n in foreign] + [n for n in (TRANSACTION, DONE) if n in foreign]
    if clash:
        raise PublishBlocked(clash)
    txn = os.path.join(target, TRANSACTION)
    new, old = os.path.join(txn, "new"), os.path.join(txn, "old")
    try:
        for folder in (txn, new, old):
            fsops.mkdir(folder)
        for name in names:
            fsops.link_or_copy(os.path.join(staged, name), os.path.join(new, name))
        fsops.write_atomic(os.path.join(new, MARKER), marker_bytes(new, names))
        install = names + [MARKER]
        journal = {"install": install, "remove": sorted(ours - set(names))}
        fsops.write_atomic(os.path.join(txn, JOURNAL), json.dumps(journal).encode())
        for name in install + journal["remove"]:
            if os.path.lexists(os.path.join(target, name)):
                fsops.rename(os.path.join(target, name), os.path.join(old, name))
        for name in install:
            fsops.rename(os.path.join(new, name), os.path.join(target, name))
        fsops.fsync_dir(target)
        fsops.rename(os.path.join(txn, JOURNAL), os.path.join(txn, COMMITTED))
        fsops.fsync_dir(txn)
    except BaseException:
        recover(target)  # back to the previous out_path (if this fails too: the next run)
        raise
    try:
        recover(target)  # committed: drop the old files
    except OSError as e:
        LOG.warning("the merge is published to %s, but %s could not be removed (%s); the next "
                    "merge into it removes it", target, txn, e)


def recover(target: str) -> None:
    """Finish or undo an interrupted publish into ``target``; nothing to do if there was none."""
    txn, done = os.path.join(target, TRANSACTION), os.path.join(target, DONE)
    if _transaction_like(done):
        fsops.remove_tree(done)  # a finished transaction whose removal was interrupted
    if not _transaction_like(txn):
        return  # none, or someone else's folder of that name (blocking_files names it)
    if not os.path.exists(os.path.join(txn, COMMITTED)):
        _roll_back(target, txn)
    # renamed before it is removed: a half-removed transaction is never read again
    fsops.rename(txn, done)
    fsops.remove_tree(done)
    fsops.fsync_dir(target)


def _roll_back(target: str, txn: str) -> None:
    new, old = os.path.join(txn, "new"), os.path.join(txn, "old")
    try:
        with open(os.path.join(txn, JOURNAL), encoding="utf-8") as fp:
            install = json.load(fp)["install"]
    except FileNotFoundError:
        install = []  # stopped before the journal: nothing in out_path was touched
    for name in install:
        placed = os.path.join(target, name)
        # installed (no longer waiting in new/) and so ours: remove it
        if not os.path.lexists(os.path.join(new, name)) and os.path.lexists(placed):
            fsops.unlink(placed)
    if os.path.isdir(old):
        for name in sorted(os.listdir(old)):
            fsops.rename(os.path.join(old, name), os.path.join(target, name))
