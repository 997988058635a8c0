"""The work directory of a merge: staged output and layer checkpoints.

``<out_path>.com-work/`` (``<out_path>/.com-work/`` when ``out_path`` is a
mount point: the work must be on the filesystem it is published to) holds
  * ``manifest.json``: a fingerprint of everything the result depends on
    (config, options, input model files, calibration data, package version);
  * ``layers/``: the layer checkpoints (``checkpoints.py``);
  * ``output/<name>/``: the model being written; published to ``out_path``
    only when complete (``publish.py``);
  * ``complete``: written once the staged model is, with each file's size
    and SHA-256, checked again before a later run publishes it.
Next to it, ``<work dir>.lock`` keeps a second merge away (``lock.py``).
A resumed run replays the checkpointed tensors to the writer and re-runs the
merged prefix on the calibration data to rebuild the activations.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional

from mergekit_com.errors import MergeInputError, listed
from mergekit_com.io import fsops, publish
from mergekit_com.io.checkpoints import LayerCheckpoints
from mergekit_com.io.fingerprint import describe_changes, file_sha256, retimed_files
from mergekit_com.io.lock import OutPathLock

LOG = logging.getLogger(__name__)

SUFFIX = ".com-work"
INSIDE = ".com-work"  # the work directory's name inside a mounted out_path
MANIFEST = "manifest.json"
COMPLETE = "complete"
FORMAT = 3  # 3: checkpoints carry a hash; models fingerprinted by content


class WorkDirError(MergeInputError):
    """A work directory that does not belong to this merge."""


class WorkDir:
    def __init__(self, out_path: str):
        self.shown = out_path  # as the user wrote it, for messages
        self.out_path = os.path.abspath(out_path)
        # a symlinked out_path: the model goes where it points
        self.target = os.path.realpath(out_path)
        self.inside = os.path.isdir(self.target) and os.path.ismount(self.target)
        self.path = (os.path.join(self.target, INSIDE) if self.inside
                     else self.target + SUFFIX)
        self.checkpoints = LayerCheckpoints(os.path.join(self.path, "layers"))
        self.output_root = os.path.join(self.path, "output")
        # same basename as out_path: mergekit names the model card after it
        self.staged = os.path.join(self.output_root, os.path.basename(self.out_path))

    def lock(self) -> OutPathLock:
        return OutPathLock(self.path + ".lock", self.shown)

    def ours_in_target(self) -> List[str]:
        """Our own entries inside out_path while a merge into a mount point runs."""
        if not self.inside:
            return []
        name = os.path.basename(self.path)
        return [name, name + ".lock", name + ".new", name + ".old"]

    # -------------------------------------------------------------- lifecycle
    def open(self, stamp: Dict[str, Any], resume_only: bool, create: bool = True) -> "WorkDir":
        """Validate an existing work directory against ``stamp``, or create one.

        ``create=False`` (ranks other than 0 under torchrun) only validates.
        """
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.lexists(self.path):
            try:
                if os.path.islink(self.path) and not os.path.isdir(self.path):
                    raise ValueError
                with open(manifest, encoding="utf-8") as fp:
                    old = json.load(fp)
                if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), dict):
                    raise ValueError  # someone else's manifest.json
            except (OSError, ValueError):
                raise WorkDirError(
                    f"{self.path} exists but is not a mergekit-com work directory; move it "
                    "away or choose another out_path"
                ) from None
            changes = describe_changes(old["fingerprint"], stamp)
            if changes:
                raise WorkDirError(
                    f"the interrupted merge in {self.path} was made with a different setup "
                    f"(changed: {', '.join(changes)}); restore that setup to resume, or delete "
                    "the directory to start over"
                )
            retimed = retimed_files(old["fingerprint"], stamp)
            if retimed:
                LOG.warning("%s: a new modification time, with the same sampled content, since the "
                            "interrupted merge in %s began; resuming. If tensors were rewritten in "
                            "place, delete that directory to start over", listed(retimed), self.path)
            if create and self.is_complete():
                LOG.warning("the merge in %s is complete; publishing it to %s", self.path, self.out_path)
            elif create:
                done = self.checkpoints.completed_layers()
                LOG.warning("resuming the merge in %s: %d layer(s) already merged", self.path, done)
            return self
        if resume_only:
            raise WorkDirError(
                f"nothing to resume: there is no work directory {self.path}; run without --resume"
            )
        if not create:
            return self
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        # The manifest is in place before the directory appears under its name. A
        # failure (a full disk) removes the half-made directory; a kill leaves it under
        # this fixed name, for the next run to remove.
        tmp = self.path + ".new"
        fsops.remove_tree(tmp)
        try:
            fsops.mkdir(tmp)
            manifest = {"fingerprint": stamp, "out_path": self.out_path}
            fsops.write_bytes(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
            fsops.rename(tmp, self.path)
            fsops.fsync_dir(parent)
        except BaseException:
            fsops.remove_tree(tmp)
            raise
        return self

    def mark_complete(self, written_with: Optional[Dict[str, Any]] = None) -> None:
        """The staged model is whole: record what it is, and the output options it was
        written with, durably."""
        publish.sync_tree(self.staged)
        files = {n: [os.path.getsize(os.path.join(self.staged, n)),
                     file_sha256(os.path.join(self.staged, n))]
                 for n in sorted(os.listdir(self.staged))}
        record = {"files": files, "written_with": written_with or {}}
        fsops.write_atomic(os.path.join(self.path, COMPLETE), json.dumps(record).encode())

    def is_complete(self) -> bool:
        return os.path.exists(os.path.join(self.path, COMPLETE))

    def _complete_record(self) -> Dict[str, Any]:
        """``files`` (name -> [size, sha256]) and ``written_with`` (None: not recorded, as
        by versions that wrote the files' map alone)."""
        try:
            with open(os.path.join(self.path, COMPLETE), encoding="utf-8") as fp:
                record = json.load(fp)
        except (OSError, ValueError):
            return {}
        if isinstance(record, dict) and "files" not in record:
            return {"files": record, "written_with": None}
        return record if isinstance(record, dict) else {}

    def rewritten_options(self, written_with: Optional[Dict[str, Any]]) -> List[str]:
        """The output options (``--out-shard-size``, ...) the finished staged model was
        written with that differ from ``written_with`` (unrecorded ones: not known to differ)."""
        before = self._complete_record().get("written_with")
        if not isinstance(before, dict):
            return []
        now = written_with or {}
        return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))

    def is_published(self) -> bool:
        """out_path holds the finished staged model's files, as published (its marker's
        sizes and times), nothing of it removed or changed since."""
        files = self._complete_record().get("files")
        if not isinstance(files, dict) or not os.path.isdir(self.target):
            return False
        ours, _ = publish.inventory(self.target, self.ours_in_target())
        return ours == set(files)

    def staged_is_intact(self) -> bool:
        """The staged model is still what ``mark_complete`` recorded."""
        files = self._complete_record().get("files")
        try:
            names = sorted(os.listdir(self.staged))
        except OSError:
            return False
        if not isinstance(files, dict) or sorted(files) != names:
            return False
        for name, (size, digest) in files.items():
            path = os.path.join(self.staged, name)
            if os.path.getsize(path) != size or file_sha256(path) != digest:
                return False
        return True

    def discard_complete(self) -> None:
        """A staged model that changed after it was complete is written again."""
        fsops.unlink(os.path.join(self.path, COMPLETE))

    def remove(self) -> None:
        """Renamed first, so that a half-removed work directory is never taken for one."""
        fsops.rename(self.path, self.path + ".old")
        fsops.remove_tree(self.path + ".old")

    def discard_staged_output(self) -> None:
        """An interrupted run's partial output is rewritten from the checkpoints."""
        fsops.remove_tree(self.output_root)

    def _rewrite_reason(self, written_with: Optional[Dict[str, Any]]) -> Optional[str]:
        """Why a finished staged model must be written again, if it must."""
        if not self.is_complete():
            return None
        changed = self.rewritten_options(written_with)
        if changed:
            return (f"the finished model in {self.path} was written with other output options "
                    f"(changed: {', '.join(changed)})")
        if not os.path.isdir(self.staged):
            if self.is_published():
                return None
            return (f"the finished model in {self.path} was published to {self.out_path}, which "
                    "no longer holds it")
        if not self.staged_is_intact():
            return f"the finished model in {self.staged} changed after it was written"
        return None

    def complete_and_publish(self, build: Callable[[], None],
                             written_with: Optional[Dict[str, Any]] = None) -> None:
        """Finish the merge (``build`` writes the staged model, resuming from the
        checkpoints, with the output options ``written_with``), publish it, and remove the
        work directory. Every step may be interrupted: the same call continues from where
        the last one stopped."""
        try:
            reason = self._rewrite_reason(written_with)
            if reason:
                LOG.warning("%s; writing it again from the layer checkpoints", reason)
                self.discard_complete()
            if not self.is_complete():
                self.discard_staged_output()
                build()
                self.mark_complete(written_with)
            # no staged model here: an earlier run published it, then stopped before removing
            # its work directory
            if os.path.isdir(self.staged):
                self.publish()
        except publish.PublishBlocked:
            raise
        except BaseException:
            if not (self.is_complete() or self.checkpoints.completed_layers(verify=False)):
                self.remove()  # nothing worth keeping
            raise
        try:
            self.remove()
        except OSError as e:
            LOG.warning("the merge is published to %s, but its work directory %s could not be "
                        "removed (%s); the next merge into it removes it", self.out_path,
                        self.path, e)

    # -------------------------------------------------------------- publishing
    def recover(self) -> None:
        """Finish or undo a publish that was interrupted (kill, power loss)."""
        fsops.remove_tree(self.path + ".old")  # a removal that was interrupted
        if os.path.isdir(self.target):
            publish.recover(self.target)

    def blocking_files(self) -> List[str]:
        return publish.blocking_files(self.target, self.ours_in_target())

    def other_files(self) -> List[str]:
        """Entries in out_path that are not ours and that the merge leaves alone."""
        if not os.path.isdir(self.target):
            return []
        return publish.inventory(self.target, self.ours_in_target())[1]

    def publish(self) -> None:
        """Move the complete staged model to out_path; safe to repeat after any fault."""
        if not os.path.isdir(self.staged):
            return  # published already by an earlier run that stopped before cleaning up
        publish.publish(self.staged, self.target, self.ours_in_target())

