"""The work directory next to the output: staged output and layer checkpoints.

``<out_path>.com-work/`` holds
  * ``manifest.json``: a fingerprint of everything the result depends on
    (config, options, input model files, calibration data, package version);
  * ``layers/pre.safetensors``, ``layers/layer-00003.safetensors``: the
    tensors written for the embeddings and for each completed decoder layer,
    with their write order in the metadata (each file appears atomically);
  * ``output/<name>/``: the model being written; renamed to ``out_path``
    only when complete.
A resumed run replays the checkpointed tensors to the writer and re-runs the
merged prefix on the calibration data to rebuild the activations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit_com.errors import MergeInputError

LOG = logging.getLogger(__name__)

SUFFIX = ".com-work"
MANIFEST = "manifest.json"
FORMAT = 2  # 2: checkpoints record (name, tensor as written), no mergekit clone flag

# (name, tensor as handed to the writer), in write order
Record = Tuple[str, torch.Tensor]


class WorkDirError(MergeInputError):
    """A work directory that does not belong to this merge."""


def work_dir_for(out_path: str) -> str:
    return os.path.abspath(out_path) + SUFFIX


# ------------------------------------------------------------------ fingerprint


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_sha256(path: str) -> Optional[str]:
    """Content hash of a calibration file or directory (None if missing)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return _file_sha256(path)
    if not os.path.isdir(path):
        return None
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            entries.append((os.path.relpath(full, path), _file_sha256(full)))
    return sha256_json(entries)


def model_stamp(path: str) -> str:
    """Names, sizes and modification times of a model directory's files.

    Not a content hash: hashing hundreds of GB would cost as much as the merge.
    """
    entries = []
    for f in sorted(os.listdir(path)):
        full = os.path.join(path, f)
        if os.path.isfile(full):
            st = os.stat(full)
            entries.append((f, st.st_size, st.st_mtime_ns))
    return sha256_json(entries)


def describe_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    changes = []
    for key, label in (("format", "work directory format"), ("package", "mergekit-com version"),
                       ("config", "merge configuration"), ("options", "device or merge options")):
        if old.get(key) != new.get(key):
            changes.append(label)
    for key, label in (("models", "model"), ("calibration", "calibration data")):
        before, after = old.get(key, {}), new.get(key, {})
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                changes.append(f"{label} {name}")
    return changes


class LayerCheckpoints:
    """``pre.safetensors`` and ``layer-NNNNN.safetensors``: the tensors written per step."""

    def __init__(self, path: str):
        self.path = path

    def _file(self, key) -> str:
        name = "pre" if key == "pre" else f"layer-{int(key):05d}"
        return os.path.join(self.path, f"{name}.safetensors")

    def has(self, key) -> bool:
        return os.path.isfile(self._file(key))

    def completed_layers(self) -> int:
        """Length of the checkpointed prefix: pre, then layers 0, 1, ..."""
        if not self.has("pre"):
            return 0
        n = 0
        while self.has(n):
            n += 1
        return n

    def save(self, key, records: List[Record], report: Optional[dict] = None) -> None:
        """The written tensors in write order, and the step's merge-report entries."""
        from safetensors.torch import save_file

        os.makedirs(self.path, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in records}
        order = [name for name, _ in records]
        final = self._file(key)
        tmp = final + ".tmp"
        save_file(tensors, tmp, metadata={"order": json.dumps(order),
                                          "report": json.dumps(report)})
        os.replace(tmp, final)  # a checkpoint is either complete or absent

    def load(self, key) -> Tuple[List[Record], Optional[dict]]:
        from safetensors import safe_open

        with safe_open(self._file(key), framework="pt") as f:
            meta = f.metadata()
            records = [(name, f.get_tensor(name)) for name in json.loads(meta["order"])]
            return records, json.loads(meta.get("report", "null"))


# ------------------------------------------------------------------ directory


class WorkDir:
    def __init__(self, out_path: str):
        self.out_path = os.path.abspath(out_path)
        self.path = work_dir_for(out_path)
        self.checkpoints = LayerCheckpoints(os.path.join(self.path, "layers"))
        self.output_root = os.path.join(self.path, "output")
        # same basename as out_path: mergekit names the model card after it
        self.staged = os.path.join(self.output_root, os.path.basename(self.out_path))
        self.previous = os.path.join(self.path, "previous")

    # -------------------------------------------------------------- lifecycle
    def open(self, stamp: Dict[str, Any], resume_only: bool, create: bool = True) -> "WorkDir":
        """Validate an existing work directory against ``stamp``, or create one.

        ``create=False`` (ranks other than 0 under torchrun) only validates.
        """
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.exists(self.path):
            try:
                with open(manifest, encoding="utf-8") as fp:
                    old = json.load(fp)
            except (OSError, ValueError):
                raise WorkDirError(
                    f"{self.path} exists but is not a mergekit-com work directory; move it "
                    "away or choose another out_path"
                ) from None
            changes = describe_changes(old.get("fingerprint", {}), stamp)
            if changes:
                raise WorkDirError(
                    f"the interrupted merge in {self.path} was made with a different setup "
                    f"(changed: {', '.join(changes)}); restore that setup to resume, or delete "
                    "the directory to start over"
                )
            if not create:
                pass
            elif self.is_complete():
                LOG.warning("the merge in %s is complete; publishing it to %s", self.path, self.out_path)
            else:
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
        # The manifest is in place before the directory appears under its name.
        tmp = tempfile.mkdtemp(prefix=".com-work-", dir=parent)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fp:
            json.dump({"fingerprint": stamp, "out_path": self.out_path}, fp, indent=1)
        os.rename(tmp, self.path)
        return self

    def mark_complete(self) -> None:
        with open(os.path.join(self.path, "complete"), "w", encoding="utf-8"):
            pass

    def is_complete(self) -> bool:
        return os.path.exists(os.path.join(self.path, "complete"))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def discard_staged_output(self) -> None:
        """An interrupted run's partial output is rewritten from the checkpoints."""
        shutil.rmtree(self.output_root, ignore_errors=True)

    # -------------------------------------------------------------- publishing
    def publish(self) -> None:
        """Move the complete staged model to out_path (docs/errors.md, row 15).

        Safe to repeat after an interruption at any point.
        """
        out = self.out_path
        if not os.path.isdir(self.staged):
            return  # moved already by an earlier, interrupted run
        if os.path.lexists(self.previous):
            pass  # interrupted after the old out_path was moved aside
        elif os.path.isdir(out) and os.listdir(out):
            # As mergekit-yaml: the new files replace same-named ones, the rest stay.
            for entry in os.listdir(out):
                target = os.path.join(self.staged, entry)
                if not os.path.lexists(target):
                    _link_or_copy(os.path.join(out, entry), target)
            os.rename(out, self.previous)
        elif os.path.isdir(out):
            os.rmdir(out)
        os.rename(self.staged, out)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links where the filesystem allows (no second copy of big files)."""
    def copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, copy_function=copy, symlinks=True)
    elif os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        copy(src, dst)
