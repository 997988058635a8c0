"""Calibration data: load records, tokenize, batch.

JSON and JSON Lines files are read with ``json`` (so an error can name its
line or record); .txt, .parquet and saved datasets with ``datasets``.
Anything malformed becomes a ``CalibrationError`` naming the file and the
line or record. Records are taken in file order; the first ``num_samples`` usable ones are
kept. Batches are right-padded and carry an attention mask so that padding
positions never enter a statistic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from mergekit_com.errors import MergeInputError

LOG = logging.getLogger("mergekit.chain_of_merges.calibration")  # under mergekit's logger

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


class CalibrationError(MergeInputError):
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


def check_exists(path: str, shown: str) -> str:
    """The resolved path of a calibration source that exists, else a clear error."""
    resolved = resolve_path(path)
    if not os.path.exists(resolved):  # False for paths with NUL characters, too
        raise CalibrationError(
            f"calibration file {shown} does not exist; fix the path (relative "
            "paths are resolved from the working directory)"
        )
    return resolved


Labeled = Tuple[str, Dict[str, Any]]  # ("line 3" / "record 3", the record)


def _decode(raw: bytes, where: str, first: bool) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{where} is not valid UTF-8 text") from None


def _record(row: Any, where: str, example: str) -> Dict[str, Any]:
    if not isinstance(row, dict):
        raise CalibrationError(
            f"{where} is a JSON {_JSON_TYPES.get(type(row), type(row).__name__)}, not an "
            f"object; {example}"
        )
    return row


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
_LINE = 'each line must hold one JSON object such as {"text": "..."}'


def _jsonl_records(path: str, shown: str) -> Iterator[Labeled]:
    """JSON Lines read line by line, so that every error can name its line."""
    with open(path, "rb") as fp:
        for number, raw in enumerate(fp, start=1):
            where = f"calibration file {shown}: line {number}"
            line = _decode(raw, where, number == 1).rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # columns count within the line
            except json.JSONDecodeError as e:
                raise CalibrationError(
                    f"{where} is not valid JSON ({e.msg} at column {e.colno}); {_LINE}"
                ) from None
            except RecursionError:
                raise CalibrationError(f"{where} is nested too deeply") from None
            yield f"line {number}", _record(row, where, _LINE)


def _json_records(path: str, shown: str) -> Iterator[Labeled]:
    """A .json file: an array of records, one record, or JSON Lines (as datasets reads them).

    Read with ``json``, not pyarrow: pyarrow's JSON reader crashed the process
    (a segfault, not an exception) on some malformed files found by fuzzing.
    """
    where = f"calibration file {shown}"
    with open(path, "rb") as fp:
        text = _decode(fp.read(), where, True)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON Lines
            yield from _jsonl_records(path, shown)
            return
        raise CalibrationError(
            f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); give "
            "a JSON array of objects or JSON Lines"
        ) from None
    except RecursionError:
        raise CalibrationError(f"{where} is nested too deeply") from None
    rows = value if isinstance(value, list) else [value]
    example = 'give a JSON array of objects such as [{"text": "..."}]'
    for number, row in enumerate(rows, start=1):
        yield f"record {number}", _record(row, f"{where}: record {number}", example)


def _dataset_records(path: str, shown: str) -> Iterator[Labeled]:
    """.txt/.parquet files and saved datasets, read with ``datasets``."""
    import datasets

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception:
            raise CalibrationError(
                f"calibration directory {shown} is not a dataset saved with "
                "datasets.save_to_disk; give a .jsonl/.json/.txt/.parquet file or such a "
                "directory"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows: Iterable = ds
    else:
        ext = os.path.splitext(path)[1].lower()
        # Streaming reads only as far as needed and writes no cache.
        rows = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train", streaming=True)
    for number, row in enumerate(rows, start=1):
        yield f"record {number}", row


def _explain_read_error(shown: str, error: Exception) -> CalibrationError:
    if isinstance(error, UnicodeDecodeError):
        return CalibrationError(f"calibration file {shown} is not valid UTF-8 text")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CalibrationError(f"calibration file {shown} could not be read ({first[:200]})")


def _check_record(where: str, row: Dict[str, Any]) -> bool:
    """Whether the record carries text; raises for records of the wrong shape."""
    text, messages = row.get("text"), row.get("messages")
    if text is None and messages is None:
        fields = ", ".join(sorted(map(str, row))[:5]) or "none"
        raise CalibrationError(
            f"{where} has neither a `text` nor a `messages` field (fields found: {fields})"
        )
    if text is not None:
        if not isinstance(text, str):
            raise CalibrationError(f"{where}: `text` must be a string, not {type(text).__name__}")
        return bool(text.strip())
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise CalibrationError(
            f"{where}: `messages` must be a list of {{\"role\": ..., \"content\": ...}} objects "
            "with string values"
        )
    return bool(messages)


def load_labeled(path: str, num_samples: int, shown: Optional[str] = None,
                 warn_short: bool = True) -> List[Labeled]:
    """The first ``num_samples`` non-empty records, each with where it came from."""
    shown = path if shown is None else shown
    path = check_exists(path, shown)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isdir(path):
        if ext not in _BUILDERS:
            raise CalibrationError(
                f"calibration file {shown}: unsupported extension {ext!r}; use "
                ".jsonl, .json, .txt, .parquet or a datasets directory"
            )
        if os.path.getsize(path) == 0:
            raise CalibrationError(f"calibration file {shown} is empty")
    reader = _dataset_records
    if not os.path.isdir(path):
        reader = {".jsonl": _jsonl_records, ".json": _json_records}.get(ext, _dataset_records)
    out: List[Labeled] = []
    total = 0
    try:
        with _quiet_datasets():
            for where, row in reader(path, shown):
                if len(out) >= num_samples:
                    break
                total += 1
                if _check_record(f"calibration file {shown}: {where}", row):
                    out.append((where, row))  # blank records carry no tokens
    except CalibrationError:
        raise
    except Exception as e:  # whatever the readers raise on a malformed file
        raise _explain_read_error(shown, e) from None
    if not out:
        raise CalibrationError(
            f"calibration file {shown} holds no text: "
            + ("it has no records" if total == 0 else f"all {total} records are blank")
        )
    if len(out) < num_samples and warn_short:
        LOG.warning(
            "calibration file %s has %d usable record(s), fewer than num_samples=%d; using them all",
            shown, len(out), num_samples,
        )
    return out


def load_records(path: str, num_samples: int) -> List[Dict[str, Any]]:
    """The first ``num_samples`` non-empty records of a calibration source."""
    return [row for _, row in load_labeled(path, num_samples)]


@contextlib.contextmanager
def _quiet_datasets():
    # datasets logs its own parse errors before raising; ours replace them.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def tokenize_records(
    records: List[Labeled], tokenizer, max_seq_len: int, shown: str
) -> List[List[int]]:
    owner = "its model's tokenizer"
    seqs = []
    for where, row in records:
        try:
            if row.get("text"):
                ids = tokenizer(row["text"], truncation=False)["input_ids"]
            else:
                if not getattr(tokenizer, "chat_template", None):
                    raise CalibrationError(
                        f"calibration file {shown} has `messages` records but {owner} has "
                        "no chat template; use `text` records instead"
                    )
                text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except CalibrationError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CalibrationError(
                f"calibration file {shown}: {where} could not be tokenized with {owner} "
                f"({first[:200]})"
            ) from None
        ids = list(ids)[:max_seq_len]
        if ids:
            seqs.append(ids)
    if not seqs:
        raise CalibrationError(
            f"calibration file {shown}: every record tokenizes to zero tokens with {owner}; "
            "give records with text the tokenizer keeps"
        )
    return seqs


def load_calibration(
    path: str, tokenizer, num_samples: int, max_seq_len: int, model: Any = None,
    warn_short: bool = True,
) -> CalibrationSet:
    shown = path if model is None else f"{path} (for model {model})"
    records = load_labeled(path, num_samples, shown, warn_short)
    seqs = tokenize_records(records, tokenizer, max_seq_len, shown)
    resolved = resolve_path(path)
    return CalibrationSet(
        path=resolved, sequences=seqs, num_records=len(records), sha256=file_sha256(resolved)
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
