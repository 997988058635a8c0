"""Calibration data: load records, tokenize, batch.

JSON and JSON Lines files are read with ``json`` (so an error can name its
line or record), .txt files line by line, .parquet and saved datasets with
``datasets``. Only regular files are opened (``inputs.open_regular``), and at
most ``record_budget(max_seq_len)`` characters of a record are kept and
tokenized: a record far longer than that is read in chunks
(``bounded_json``), so one huge record costs no more memory than a normal one.
Anything malformed becomes a ``CalibrationError`` naming the file and the
line or record. Records are taken in file order; the first ``num_samples`` usable ones are
kept. Batches group sequences of similar length, are right-padded and carry
an attention mask so that padding positions never enter a statistic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from mergekit_com.errors import CalibrationError, first_line
from mergekit_com.io import bounded_json
from mergekit_com.io.datasets_source import RecordSpec, is_dataset, open_dataset
from mergekit_com.io.fingerprint import file_sha256
from mergekit_com.io.inputs import not_regular, open_regular, tree_entries

LOG = logging.getLogger("mergekit.chain_of_merges.calibration")  # under mergekit's logger

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def record_budget(max_seq_len: int) -> int:
    """Characters of a record kept: far more than ``max_seq_len`` tokens ever take."""
    return 64 * max_seq_len + 4096


def _line_cap(budget: Optional[int]) -> int:
    """Bytes of a line read whole; longer lines are parsed in chunks (up to 6 bytes a character)."""
    return -1 if budget is None else 8 * budget + 1024


@dataclass
class CalibrationSet:
    path: str
    sequences: List[List[int]]
    num_records: int
    sha256: Optional[str]
    origin: Dict[str, Any]  # what the report and the card say about the source

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


def _jsonl_records(path: str, shown: str, budget: Optional[int] = None,
                   keys: Sequence[str] = bounded_json.RECORD_KEYS) -> Iterator[Labeled]:
    """JSON Lines read line by line, so that every error can name its line. A line too
    long to read whole keeps only the fields ``keys`` (those the records are read from)."""
    cap = _line_cap(budget)
    with open_regular(path) as fp:
        for number, raw in enumerate(iter(lambda: fp.readline(cap), b""), start=1):
            where = f"calibration file {shown}: line {number}"
            if cap > 0 and len(raw) >= cap and not raw.endswith(b"\n"):
                row = _long_line(fp, raw, budget, where, number == 1, keys)
                if row is not None:  # None: blank, as a short blank line is
                    yield f"line {number}", row
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


def _long_line(fp, first: bytes, budget: int, where: str, bom: bool,
               keys: Sequence[str]) -> Optional[Dict[str, Any]]:
    """A line too long to read whole: parsed in chunks, its text cut to ``budget``."""
    read = bounded_json.LineReader(fp, first)
    try:
        row = bounded_json.parse_record(read, budget, bom=bom, keys=keys)
    except bounded_json.JsonSyntaxError as e:
        raise CalibrationError(f"{where} is not valid JSON ({e}); {_LINE}") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"{where} is not valid UTF-8 text") from None
    except RecursionError:
        raise CalibrationError(f"{where} is nested too deeply") from None
    read.finish()
    return None if row is bounded_json.BLANK else _record(row, where, _LINE)


def _json_records(path: str, shown: str, budget: Optional[int] = None,
                  keys: Sequence[str] = bounded_json.RECORD_KEYS) -> Iterator[Labeled]:
    """A .json file: an array of records, one record, or JSON Lines (as datasets reads them).

    Read with ``json``, not pyarrow: pyarrow's JSON reader crashed the process
    (a segfault, not an exception) on some malformed files found by fuzzing.
    """
    where = f"calibration file {shown}"
    if budget is not None and os.path.getsize(path) > _line_cap(budget):
        yield from _long_json_records(path, where, budget, keys)
        return
    with open_regular(path) as fp:
        text = _decode(fp.read(), where, True)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON Lines
            yield from _jsonl_records(path, shown, keys=keys)
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


def _long_json_records(path: str, where: str, budget: int, keys: Sequence[str]) -> Iterator[Labeled]:
    """A large .json file, record by record, each cut to ``budget`` (fields ``keys`` only)."""
    with open_regular(path) as fp:
        records = bounded_json.iter_records(lambda: fp.read(bounded_json.CHUNK), budget, keys)
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


def _txt_records(path: str, shown: str, budget: Optional[int] = None,
                 keys: Sequence[str] = ()) -> Iterator[Labeled]:
    """A .txt file: one record per line (as datasets' text builder reads it), cut to ``budget``."""
    cap = -1 if budget is None else budget
    with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig") as fp:
        for number, line in enumerate(iter(lambda: fp.readline(cap), ""), start=1):
            if cap > 0 and len(line) >= cap and not line.endswith("\n"):
                rest = fp.readline(bounded_json.CHUNK)  # a line longer than the budget:
                while rest and not rest.endswith("\n"):  # skip what is left of it
                    rest = fp.readline(bounded_json.CHUNK)
            yield f"record {number}", {"text": line.rstrip("\n")}


def _dataset_records(path: str, shown: str, spec: RecordSpec = RecordSpec()) -> Iterator[Labeled]:
    """.parquet files and saved datasets, read with ``datasets``."""
    import datasets

    if os.path.isdir(path):
        rows: Iterable = _saved_dataset(path, shown, spec)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext == ".parquet":
            import pyarrow.parquet as pq

            if pq.ParquetFile(path).metadata.num_rows == 0:
                return  # no records (datasets' streaming reader fails on it: "BatchSize ... 0")
        # Streaming reads only as far as needed and writes no cache.
        rows = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train", streaming=True)
    for number, row in enumerate(rows, start=1):
        yield f"record {number}", row


def _saved_dataset(path: str, shown: str, spec: RecordSpec) -> Iterable:
    """The rows of a folder written by ``save_to_disk``: a ``Dataset`` (one split: whichever
    it was saved from, unless ``calibration_split`` names another) or a ``DatasetDict`` (its
    ``calibration_split``). Neither has configurations."""
    import datasets

    where = f"calibration directory {shown}"
    saved = [f for f in ("state.json", "dataset_dict.json") if os.path.isfile(os.path.join(path, f))]
    try:
        if saved == ["state.json"]:
            with open(os.path.join(path, "state.json"), encoding="utf-8") as fp:
                if not json.load(fp).get("_data_files", True):
                    return []  # saved with no rows: datasets fails to load it (IndexError)
        ds = datasets.load_from_disk(path)
    except Exception as e:
        if not saved:
            raise CalibrationError(
                f"{where} is neither a dataset saved with datasets.save_to_disk nor a dataset "
                "repository (README.md and data files); give one of those or a "
                ".jsonl/.json/.txt/.parquet file"
            ) from None
        raise CalibrationError(f"{where} is a saved dataset that could not be read "
                               f"({first_line(e)})") from None
    if spec.config is not None:
        raise CalibrationError(f"{where} is a saved dataset, which has no configurations; remove "
                               "calibration_config")
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise CalibrationError(
                f"{where} has no split '{spec.split}'; set calibration_split to one of: "
                f"{', '.join(ds)}")
        return ds[spec.split]
    if spec.split not in ("train", ds.split):  # the default takes whatever split it is
        raise CalibrationError(
            f"{where} holds one saved split ({ds.split or 'no split name'}), not a DatasetDict "
            f"with a split '{spec.split}'; remove calibration_split or save the DatasetDict")
    return ds


def _explain_read_error(shown: str, error: Exception) -> CalibrationError:
    if isinstance(error, UnicodeDecodeError):
        return CalibrationError(f"calibration file {shown} is not valid UTF-8 text")
    return CalibrationError(f"calibration file {shown} could not be read ({first_line(error)})")


def _check_record(where: str, row: Dict[str, Any]) -> bool:
    """Whether the record carries text; raises for records of the wrong shape. A blank or
    null ``text`` gives way to ``messages`` where the record has them (``has_text``)."""
    text, messages = row.get("text"), row.get("messages")
    if "text" not in row and "messages" not in row:
        fields = ", ".join(sorted(map(str, row))[:5]) or "none"
        raise CalibrationError(
            f"{where} has neither a `text` nor a `messages` field (fields found: {fields}); "
            "set calibration_column or calibration_template"
        )
    if text is not None and not isinstance(text, str):
        raise CalibrationError(f"{where}: `text` must be a string, not {type(text).__name__}")
    if has_text(row) or messages is None:
        return has_text(row)
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise CalibrationError(
            f"{where}: `messages` must be a list of {{\"role\": ..., \"content\": ...}} objects "
            "with string values"
        )
    return bool(messages)


def has_text(row: Dict[str, Any]) -> bool:
    """Whether a record is read from its ``text`` (else from its ``messages``)."""
    text = row.get("text")
    return isinstance(text, str) and bool(text.strip())


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


def _open_file(path: str, shown: str, spec: RecordSpec,
               budget: Optional[int]) -> Iterator[Labeled]:
    """The records of a local file or saved dataset, after checks that need no reading."""
    path = check_source(path, shown)
    if os.path.isdir(path):
        return _dataset_records(path, shown, spec)
    for name, value in (("calibration_split", spec.split != "train"),
                        ("calibration_config", spec.config is not None)):
        if value:
            raise CalibrationError(
                f"calibration file {shown} is one file, with no splits or configs; remove "
                f"{name} (it applies to datasets)")
    reader = {".jsonl": _jsonl_records, ".json": _json_records,
              ".txt": _txt_records}.get(os.path.splitext(path)[1].lower())
    return reader(path, shown, budget, spec.fields(shown)) if reader else _dataset_records(path, shown)


def load_labeled(path: str, num_samples: int, shown: Optional[str] = None,
                 warn_short: bool = True, spec: RecordSpec = RecordSpec(),
                 max_seq_len: Optional[int] = None) -> Tuple[List[Labeled], Dict[str, Any]]:
    """The first ``num_samples`` non-empty records, each with where it came from, and
    the source's origin for the report. With ``max_seq_len``, a local file's records are
    cut to ``record_budget(max_seq_len)`` characters as they are read."""
    shown = path if shown is None else shown
    spec.check(shown)
    budget = None if max_seq_len is None else record_budget(max_seq_len)
    noun = "calibration file"
    out: List[Labeled] = []
    total = 0
    try:
        with _quiet_datasets(_read_by_datasets(path)):
            if is_dataset(path):  # a Hub id or a downloaded repository folder
                noun = "calibration dataset"
                opened = open_dataset(path, spec, shown)
                rows, origin = opened.rows, opened.origin
            else:
                rows = _open_file(path, shown, spec, budget)
                origin = {"file": os.path.basename(resolve_path(path)), **spec.described()}
            for where, row in rows:
                if len(out) >= num_samples:
                    break
                total += 1
                full = f"{noun} {shown}: {where}"
                record = spec.record(row, full)
                if _check_record(full, record):
                    out.append((where, record))  # blank records carry no tokens
    except CalibrationError:
        raise
    except Exception as e:  # whatever the readers raise on a malformed file
        raise _explain_read_error(shown, e) from None
    if not out:
        raise CalibrationError(
            f"{noun} {shown} holds no text: "
            + ("it has no records" if total == 0 else f"all {total} records are blank")
        )
    if len(out) < num_samples and warn_short:
        LOG.warning(
            "%s %s has %d usable record(s), fewer than num_samples=%d; using them all",
            noun, shown, len(out), num_samples,
        )
    return out, origin


def _read_by_datasets(path: str) -> bool:
    """Whether the ``datasets`` library reads this source (not our .jsonl/.json/.txt readers)."""
    return is_dataset(path) or os.path.splitext(path)[1].lower() not in (".jsonl", ".json", ".txt")


@contextlib.contextmanager
def _quiet_datasets(imports: bool = True):
    # datasets logs its own parse errors before raising; ours replace them. ``imports``: the
    # source is read by datasets, which is imported first here: its first import sets its
    # logger's level, which would undo ours (a .jsonl file never imports it: 1-2 s saved).
    if imports:
        import datasets  # noqa: F401

    loggers = [logging.getLogger(n) for n in ("datasets", "huggingface_hub.repocard")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def tokenize_records(
    records: List[Labeled], tokenizer, max_seq_len: int, shown: str,
    noun: str = "calibration file", chat_template: Optional[str] = None,
    owner: str = "its model's tokenizer",
) -> List[List[int]]:
    """Each record's token ids (at most ``max_seq_len``). ``messages`` are rendered with
    ``chat_template``, or else ``tokenizer``'s own (``owner`` names where it was looked
    for, in the message when there is none)."""
    budget = record_budget(max_seq_len)
    seqs = []
    for where, row in records:
        try:
            if has_text(row):
                text = row["text"][:budget]
                _check_unicode(text, noun, shown, where)
                # verbose=False: records longer than the model's positions are cut below,
                # so transformers' warning that they are too long would only mislead
                ids = tokenizer(text, truncation=False, verbose=False)["input_ids"]
            else:
                template = chat_template or getattr(tokenizer, "chat_template", None)
                if not template:
                    raise CalibrationError(
                        f"{noun} {shown} has `messages` records but {owner} has no chat "
                        "template; set chat_template: in the merge config (chatml, for "
                        "example) or use `text` records"
                    )
                text = tokenizer.apply_chat_template(_cut(row["messages"], budget),
                                                     chat_template=template, tokenize=False)
                _check_unicode(text, noun, shown, where)
                ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        except CalibrationError:
            raise
        except Exception as e:
            raise CalibrationError(
                f"{noun} {shown}: {where} could not be tokenized with {owner} "
                f"({first_line(e)})"
            ) from None
        ids = list(ids)[:max_seq_len]
        if ids:
            seqs.append(ids)
    if not seqs:
        raise CalibrationError(
            f"{noun} {shown}: every record tokenizes to zero tokens with {owner}; "
            "give records with text the tokenizer keeps"
        )
    return seqs


def _check_unicode(text: str, noun: str, shown: str, where: str) -> None:
    """Text a tokenizer can take: JSON's ``\\ud800``-style escapes can leave a lone
    surrogate, which is not a character, and tokenizers reject it with a type error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CalibrationError(
            f"{noun} {shown}: {where} holds {text[e.start]!r} at character {e.start}, half of "
            "a UTF-16 surrogate pair (an escape such as \\ud800 without its other half), "
            "which is not text; remove it or write the character whole"
        ) from None


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
    warn_short: bool = True, spec: RecordSpec = RecordSpec(),
    chat_template: Optional[str] = None, owner: str = "its model's tokenizer",
) -> CalibrationSet:
    shown = path if model is None else f"{path} (for model {model})"
    records, origin = load_labeled(path, num_samples, shown, warn_short, spec,
                                   max_seq_len=max_seq_len)
    noun = "calibration dataset" if "dataset" in origin else "calibration file"
    seqs = tokenize_records(records, tokenizer, max_seq_len, shown, noun, chat_template, owner)
    if "dataset" in origin:
        return CalibrationSet(path=path, sequences=seqs, num_records=len(records), sha256=None,
                              origin=origin)
    resolved = resolve_path(path)
    sha256 = file_sha256(resolved) if os.path.isfile(resolved) else None  # None: a folder
    return CalibrationSet(path=resolved, sequences=seqs, num_records=len(records),
                          sha256=sha256, origin={**origin, "sha256": sha256})


def make_batches(
    sequences: List[List[int]], batch_size: int, pad_id: int = 0,
    max_tokens: Optional[int] = None,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches of sequences of similar length.

    Sequences are taken longest first (ties in file order), so each batch pads
    only to its own longest: on the zoos' calibration data, padding falls from
    up to 16% of the positions in file order to under 2%. A batch holds up to
    ``max_tokens`` positions, padding included (default: ``batch_size`` times
    the longest sequence): full-length data batches ``batch_size`` sequences at
    a time, short records share a batch instead of paying a forward each
    (the same peak memory either way). Padding positions never enter a
    statistic.
    """
    ordered = sorted(sequences, key=len, reverse=True)  # stable: ties keep file order
    budget = max_tokens or batch_size * len(ordered[0])
    chunks: List[List[List[int]]] = []
    for seq in ordered:
        if chunks and (len(chunks[-1]) + 1) * len(chunks[-1][0]) <= budget:
            chunks[-1].append(seq)
        else:
            chunks.append([seq])
    return [_padded(chunk, pad_id) for chunk in chunks]


def _padded(chunk: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    width = len(chunk[0])  # the longest: sequences come longest first
    lengths = torch.tensor([len(seq) for seq in chunk])
    valid = torch.arange(width) < lengths[:, None]
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    # row-major, as the sequences come: one copy for the batch, not one per sequence
    ids[valid] = torch.tensor([t for seq in chunk for t in seq], dtype=torch.long)
    return ids, valid.long()
