"""What a merge's result depends on, cheaply hashed: a resume with anything changed is refused.

Model folders are fingerprinted by content, not by sizes and modification
times alone (a model replaced by another of the same size, with its times set
back, must not resume onto the old one's layers): every small file is
hashed whole; a large weight file by its size, its safetensors header and 64
blocks of 64 KiB spread evenly over it. Two fine-tunes differ in nearly every
block, so this detects a replaced model while reading about 4 MiB per file
instead of the whole model. A few tensors rewritten in place (a fix, a
re-export) may fall between the blocks: large files' modification times are
recorded apart (``large_file_times``), and a resume names any that changed in a
warning rather than refusing (a copy of the same model to node-local scratch, a
fresh download or another rank's machine has other times, same content).
Calibration data is hashed whole.
Only regular files are read (``inputs.open_regular``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Dict, List, Optional

from mergekit_com.io.inputs import open_regular, tree_entries

SMALL_FILE = 8 << 20  # hashed whole up to this size
BLOCKS, BLOCK = 64, 64 << 10
HEADER_LIMIT = 100 << 20  # safetensors' own limit on a header


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open_regular(path) as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sampled_sha256(path: str) -> str:
    """Size, safetensors header (if any) and evenly spread blocks of a large file."""
    h = hashlib.sha256()
    with open_regular(path) as fp:
        size = os.fstat(fp.fileno()).st_size
        h.update(struct.pack("<Q", size))
        head = fp.read(8)
        if path.endswith(".safetensors") and len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            if length <= min(HEADER_LIMIT, size - 8):
                h.update(fp.read(length))
        for i in range(BLOCKS):
            fp.seek((size - BLOCK) * i // (BLOCKS - 1) if size > BLOCK else 0)
            h.update(fp.read(BLOCK))
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """Content fingerprint of a model folder's files (top level, as mergekit reads them)."""
    entries = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue  # folders; anything else was refused before (preflight)
        size = os.path.getsize(full)
        digest = file_sha256(full) if size <= SMALL_FILE else sampled_sha256(full)
        entries.append((name, size, digest))
    return sha256_json(entries)


def large_file_times(path: str) -> Dict[str, int]:
    """Modification times (ns) of a model folder's files that are fingerprinted by samples."""
    times = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and os.path.getsize(full) > SMALL_FILE:
            times[name] = os.stat(full).st_mtime_ns
    return times


def retimed_files(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``model: file`` for each large weight file whose modification time changed while its
    sampled content did not (the stamps' ``times``; none recorded: none named)."""
    before, after = old.get("times") or {}, new.get("times") or {}
    return [f"{model}: {name}" for model in sorted(after) for name in sorted(after[model])
            if name in before.get(model, {}) and before[model][name] != after[model][name]]


def data_sha256(path: str) -> Optional[str]:
    """Content hash of a calibration file or directory (None if it is neither)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return file_sha256(path)
    if not os.path.isdir(path):
        return None
    entries = [(name, file_sha256(full)) for name, full in tree_entries(path)
               if os.path.isfile(full)]
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
