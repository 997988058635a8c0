"""Calibration data: load records with ``datasets``, tokenize, batch.

Records are taken in file order; the first ``num_samples`` usable ones are
kept. Batches are right-padded and carry an attention mask so that padding
positions never enter a statistic.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

LOG = logging.getLogger("mergekit.chain_of_merges.calibration")  # under mergekit's logger

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says what to fix."""


@dataclass
class CalibrationSet:
    path: str
    sequences: List[List[int]]
    num_records: int
    sha256: Optional[str]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def resolve_path(path: str) -> str:
    # mergekit resolves local model paths against the working directory.
    return os.path.abspath(os.path.expanduser(path))


def file_sha256(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_records(path: str, num_samples: int) -> List[Dict[str, Any]]:
    """The first ``num_samples`` non-empty records of a calibration source."""
    import datasets

    if not os.path.exists(path):
        raise CalibrationError(f"calibration file {path} does not exist")
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise CalibrationError(
                f"calibration directory {path} is not a dataset saved with "
                f"datasets.save_to_disk ({e})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows = iter(ds)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise CalibrationError(
                f"calibration file {path}: unsupported extension {ext!r}; use "
                ".jsonl, .json, .txt, .parquet or a datasets directory"
            )
        # Streaming reads only as far as needed and writes no cache.
        rows = iter(
            datasets.load_dataset(
                _BUILDERS[ext], data_files=path, split="train", streaming=True
            )
        )
    out: List[Dict[str, Any]] = []
    try:
        for number, row in enumerate(rows, start=1):
            if len(out) >= num_samples:
                break
            text, messages = row.get("text"), row.get("messages")
            if text is None and not messages:
                raise CalibrationError(
                    f"calibration file {path}: record {number} has neither a `text` "
                    "nor a `messages` field"
                )
            if messages or text.strip():
                out.append(row)  # blank lines carry no tokens
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(f"calibration file {path} could not be read: {e}") from None
    if not out:
        raise CalibrationError(f"calibration file {path} holds no usable records")
    if len(out) < num_samples:
        LOG.warning(
            "calibration file %s has %d records, fewer than num_samples=%d; using them all",
            path, len(out), num_samples,
        )
    return out


def tokenize_records(
    records: List[Dict[str, Any]], tokenizer, max_seq_len: int, path: str
) -> List[List[int]]:
    seqs = []
    for row in records:
        if row.get("text"):
            ids = tokenizer(row["text"], truncation=False)["input_ids"]
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise CalibrationError(
                    f"calibration file {path} has `messages` records but the model's "
                    "tokenizer has no chat template; use `text` records instead"
                )
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = list(ids)[:max_seq_len]
        if ids:
            seqs.append(ids)
    if not seqs:
        raise CalibrationError(f"calibration file {path}: every record tokenizes to zero tokens")
    return seqs


def load_calibration(
    path: str, tokenizer, num_samples: int, max_seq_len: int
) -> CalibrationSet:
    path = resolve_path(path)
    records = load_records(path, num_samples)
    seqs = tokenize_records(records, tokenizer, max_seq_len, path)
    return CalibrationSet(
        path=path, sequences=seqs, num_records=len(records), sha256=file_sha256(path)
    )


def make_batches(
    sequences: List[List[int]], batch_size: int, pad_id: int = 0
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches, in file order."""
    batches = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append((ids, mask))
    return batches
