"""Calibration data: load records, tokenize, batch.

JSON and JSON Lines files are read with ``json`` (so an error can name its
line or record), .txt files line by line, .parquet and saved datasets with
``datasets``. Only regular files are opened (``inputs.open_regular``), and at
most ``record_budget(max_seq_len)`` characters of a record are kept and
tokenized: a record far longer than that is read in chunks
(``bounded_json``), so one huge record costs no more memory than a normal one.
Anything malformed becomes a ``CalibrationError`` naming the file and the
line or record. Records are taken in file order; the first ``num_samples`` usable ones are
kept. Batches are right-padded and carry an attention mask so that padding
positions never enter a statistic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from mergekit_com.errors import MergeInputError
from mergekit_com.io import bounded_json
from mergekit_com.io.fingerprint import file_sha256
from mergekit_com.io.inputs import open_regular, not_regular, tree_entries

LOG = logging.getLogger("mergekit.chain_of_merges.calibration")  # under mergekit's logger

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def record_budget(max_seq_len: int) -> int:
    """Characters of a record kept: far more than ``max_seq_len`` tokens ever take."""
    return 64 * max_seq_len + 4096


def _line_cap(budget: Optional[int]) -> int:
    """Bytes of a line read whole; longer lines are parsed in chunks (up to 6 bytes a character)."""
    return -1 if budget is None else 8 * budget + 1024


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


def _jsonl_records(path: str, shown: str, budget: Optional[int] = None) -> Iterator[Labeled]:
    """JSON Lines read line by line, so that every error can name its line."""
    cap = _line_cap(budget)
    with open_regular(path) as fp:
        for number, raw in enumerate(iter(lambda: fp.readline(cap), b""), start=1):
            where = f"calibration file {shown}: line {number}"
            if cap > 0 and len(raw) >= cap and not raw.endswith(b"\n"):
                yield f"line {number}", _long_line(fp, raw, budget, where, number == 1)
                continue
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


def _long_line(fp, first: bytes, budget: int, where: str, bom: bool) -> Dict[str, Any]:
    """A line too long to read whole: parsed in chunks, its text cut to ``budget``."""
    read = bounded_json.LineReader(fp, first)
    try:
        row = bounded_json.parse_record(read, budget, bom=bom)
    except bounded_json.JsonSyntaxError as e:
        raise CalibrationError(f"{where} is not valid JSON ({e}); {_LINE}") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"{where} is not valid UTF-8 text") from None
    except RecursionError:
        raise CalibrationError(f"{where} is nested too deeply") from None
    read.finish()
    return _record(row, where, _LINE)


def _json_records(path: str, shown: str, budget: Optional[int] = None) -> Iterator[Labeled]:
    """A .json file: an array of records, one record, or JSON Lines (as datasets reads them).

    Read with ``json``, not pyarrow: pyarrow's JSON reader crashed the process
    (a segfault, not an exception) on some malformed files found by fuzzing.
    """
    where = f"calibration file {shown}"
    if budget is not None and os.path.getsize(path) > _line_cap(budget):
        yield from _long_json_records(path, where, budget)
        return
    with open_regular(path) as fp:
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
    for number, row in enumerate(rows, start=1):
        yield f"record {number}", _record(row, f"{where}: record {number}", _ARRAY)


_ARRAY = 'give a JSON array of objects such as [{"text": "..."}]'


def _long_json_records(path: str, where: str, budget: int) -> Iterator[Labeled]:
    """A large .json file, record by record, each cut to ``budget``."""
    with open_regular(path) as fp:
        records = bounded_json.iter_records(lambda: fp.read(bounded_json.CHUNK), budget)
        number = 0
        try:
            for number, row in enumerate(records, start=1):
                yield f"record {number}", _record(row, f"{where}: record {number}", _ARRAY)
        except bounded_json.JsonSyntaxError as e:
            raise CalibrationError(
                f"{where} is not valid JSON (after record {number}: {e.msg} at character "
                f"{e.colno}); give a JSON array of objects or JSON Lines") from None
        except UnicodeDecodeError:
            raise CalibrationError(f"{where} is not valid UTF-8 text") from None
        except RecursionError:
            raise CalibrationError(f"{where}: record {number + 1} is nested too deeply") from None


def _txt_records(path: str, shown: str, budget: Optional[int] = None) -> Iterator[Labeled]:
    """A .txt file: one record per line (as datasets' text builder reads it), cut to ``budget``."""
    cap = -1 if budget is None else budget
    with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as fp:
        for number, line in enumerate(iter(lambda: fp.readline(cap), ""), start=1):
            if cap > 0 and len(line) >= cap and not line.endswith("\n"):
                rest = fp.readline(bounded_json.CHUNK)  # a line longer than the budget:
                while rest and not rest.endswith("\n"):  # skip what is left of it
                    rest = fp.readline(bounded_json.CHUNK)
            yield f"record {number}", {"text": line.rstrip("\n")}


def _dataset_records(path: str, shown: str, budget: Optional[int] = None) -> Iterator[Labeled]:
    """.parquet files and saved datasets, read with ``datasets`` (a row is read whole)."""
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


def check_source(path: str, shown: Optional[str] = None) -> str:
    """A calibration path that can be read: a regular file of a known kind with something
    in it, or a directory of regular files. Checked before anything reads (or hashes) it;
    returns the resolved path."""
    shown = path if shown is None else shown
    path = check_exists(path, shown)
    kind = not_regular(path)
    if kind is not None:
        raise CalibrationError(f"calibration file {shown} is {kind}, not a regular file")
    if os.path.isdir(path):
        for name, full in tree_entries(path):
            kind = not_regular(full)
            if kind is not None:
                raise CalibrationError(
                    f"calibration directory {shown}: {name} is {kind}, not a regular file")
        return path
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise CalibrationError(
            f"calibration file {shown}: unsupported extension {ext!r}; use "
            ".jsonl, .json, .txt, .parquet or a datasets directory"
        )
    if os.path.getsize(path) == 0:
        raise CalibrationError(f"calibration file {shown} is empty")
    return path


def load_labeled(path: str, num_samples: int, shown: Optional[str] = None,
                 warn_short: bool = True, max_seq_len: Optional[int] = None) -> List[Labeled]:
    """The first ``num_samples`` non-empty records, each with where it came from.

    With ``max_seq_len``, each record is cut to ``record_budget(max_seq_len)``
    characters as it is read.
    """
    shown = path if shown is None else shown
    path = check_source(path, shown)
    budget = None if max_seq_len is None else record_budget(max_seq_len)
    reader = _dataset_records
    if not os.path.isdir(path):
        reader = {".jsonl": _jsonl_records, ".json": _json_records,
                  ".txt": _txt_records}.get(os.path.splitext(path)[1].lower(), _dataset_records)
    out: List[Labeled] = []
    total = 0
    try:
        with _quiet_datasets():
            for where, row in reader(path, shown, budget):
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
    budget = record_budget(max_seq_len)
    seqs = []
    for where, row in records:
        try:
            if row.get("text"):
                ids = tokenizer(row["text"][:budget], truncation=False)["input_ids"]
            else:
                if not getattr(tokenizer, "chat_template", None):
                    raise CalibrationError(
                        f"calibration file {shown} has `messages` records but {owner} has "
                        "no chat template; use `text` records instead"
                    )
                text = tokenizer.apply_chat_template(_cut(row["messages"], budget), tokenize=False)
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


def _cut(messages: List[Dict[str, str]], budget: int) -> List[Dict[str, str]]:
    """The messages whose content falls within the first ``budget`` characters."""
    out = []
    for m in messages:
        if budget <= 0:
            break
        out.append({**m, "content": m["content"][:budget]})
        budget -= len(m["content"]) + 1
    return out


def load_calibration(
    path: str, tokenizer, num_samples: int, max_seq_len: int, model: Any = None,
    warn_short: bool = True,
) -> CalibrationSet:
    shown = path if model is None else f"{path} (for model {model})"
    records = load_labeled(path, num_samples, shown, warn_short, max_seq_len=max_seq_len)
    seqs = tokenize_records(records, tokenizer, max_seq_len, shown)
    resolved = resolve_path(path)
    return CalibrationSet(
        path=resolved, sequences=seqs, num_records=len(records),
        sha256=file_sha256(resolved) if os.path.isfile(resolved) else None,
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
