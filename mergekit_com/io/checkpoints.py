"""Layer checkpoints: the tensors written per step of the walk, verified and durable.

``pre.safetensors`` (embeddings) and ``layer-NNNNN.safetensors`` hold the
tensors written for that step, their write order, the step's merge-report
entries and a SHA-256 of all of it. A file is written under a temporary
name, synced, renamed, and its directory synced: after a crash it is either
complete or absent. On resume each one is read back and its hash checked; a
truncated or altered checkpoint is discarded with a warning and that layer
is merged again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import List, Optional, Tuple

import torch

from mergekit_com.errors import first_line
from mergekit_com.io import fsops

LOG = logging.getLogger("mergekit.chain_of_merges.checkpoints")

# (name, tensor as handed to the writer), in write order
Record = Tuple[str, torch.Tensor]


class BadCheckpoint(Exception):
    pass


def records_sha256(records: List[Record], report: Optional[dict]) -> str:
    h = hashlib.sha256(json.dumps([[n for n, _ in records], report]).encode())
    for name, t in records:
        t = t.detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class LayerCheckpoints:
    """``pre.safetensors`` and ``layer-NNNNN.safetensors``: the tensors written per step.

    ``discard``: whether a bad checkpoint may be deleted (only the rank that
    writes them, under torchrun; the others just do not use it).
    """

    def __init__(self, path: str, discard: bool = True):
        self.path = path
        self.discard = discard
        self._verified = set()

    def _file(self, key) -> str:
        name = "pre" if key == "pre" else f"layer-{int(key):05d}"
        return os.path.join(self.path, f"{name}.safetensors")

    def has(self, key) -> bool:
        return os.path.isfile(self._file(key))

    def completed_layers(self, verify: bool = True) -> int:
        """Length of the checkpointed prefix: pre, then layers 0, 1, ...

        Each checkpoint is read back and its hash checked (``verify=False``:
        only counted, for a message).
        """
        usable = self._usable if verify else self.has
        if not usable("pre"):
            return 0
        n = 0
        while usable(n):
            n += 1
        return n

    def _usable(self, key) -> bool:
        if key in self._verified:
            return True
        if not self.has(key):
            return False
        try:
            self._read(key)
        except BadCheckpoint as e:
            LOG.warning("checkpoint %s is damaged (%s); %s", self._file(key), e,
                        "discarding it and merging that step again" if self.discard
                        else "merging that step again")
            if self.discard:
                fsops.unlink(self._file(key))
            return False
        self._verified.add(key)
        return True

    def save(self, key, records: List[Record], report: Optional[dict] = None) -> None:
        """The written tensors in write order, and the step's merge-report entries."""
        os.makedirs(self.path, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in records}
        order = [name for name, _ in records]
        final = self._file(key)
        tmp = final + ".tmp"
        metadata = {"order": json.dumps(order), "report": json.dumps(report),
                    "sha256": records_sha256(records, report)}
        fsops.save_tensors(tensors, tmp, metadata)
        fsops.fsync_file(tmp)
        fsops.rename(tmp, final)  # a checkpoint is either complete or absent
        fsops.fsync_dir(self.path)
        self._verified.add(key)

    def load(self, key) -> Tuple[List[Record], Optional[dict]]:
        try:
            return self._read(key)
        except BadCheckpoint as e:  # changed since completed_layers() checked it
            raise OSError(f"checkpoint {self._file(key)} changed during the merge ({e})") from None

    def _read(self, key) -> Tuple[List[Record], Optional[dict]]:
        from safetensors import safe_open

        try:
            with safe_open(self._file(key), framework="pt") as f:
                meta = f.metadata() or {}
                records = [(name, f.get_tensor(name)) for name in json.loads(meta["order"])]
                report = json.loads(meta.get("report", "null"))
        except Exception as e:  # truncated, not safetensors, metadata missing
            raise BadCheckpoint(first_line(e)) from None
        if meta.get("sha256") != records_sha256(records, report):
            raise BadCheckpoint("its content does not match its hash")
        return records, report
