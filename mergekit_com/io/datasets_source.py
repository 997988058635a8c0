"""Calibration data from Hugging Face datasets: a Hub id or a downloaded dataset repository.

``calibration: org/name`` (a Hub dataset id) and a folder holding a dataset
repository as ``hf download --repo-type dataset`` leaves it (a
``README.md`` and data files) are both opened by ``datasets`` itself:
``load_dataset_builder`` then ``as_streaming_dataset``, which is what
``load_dataset(..., streaming=True)`` does, keeping the builder, whose hash is
the Hub revision. Rows are streamed, so a large dataset is read only as far as
the first ``num_samples`` usable rows; offline (``HF_HUB_OFFLINE=1``) a Hub id
is read from the ``datasets`` cache.

``RecordSpec`` holds the per-model settings that say which rows to read
(split, config) and how a row becomes a calibration record (a column or a
template); the column and template apply to local files too.
"""

from __future__ import annotations

import glob
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from mergekit_com.errors import CalibrationError, first_line, one_line
from mergekit_com.io.fingerprint import data_sha256, sha256_json

# Parameter names of the settings below, as written under a model's `parameters:`.
SPEC_PARAMETERS = ("calibration_split", "calibration_config", "calibration_column",
                   "calibration_template")
# Names that are local files even when missing, never Hub ids ("data/math.jsonl").
FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # datasets.save_to_disk's folders


@dataclass(frozen=True)
class RecordSpec:
    """Which rows of a source to read, and how a row becomes a ``text``/``messages`` record."""

    split: str = "train"
    config: Optional[str] = None
    column: Optional[str] = None
    template: Optional[str] = None

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> "RecordSpec":
        # mergekit resolves each setting on its own, and a null falls through to the
        # broader scope: "" is how a model clears a column or template set for all
        values = [params.get(name) or None for name in SPEC_PARAMETERS]
        return cls(values[0] or "train", *values[1:])

    def described(self) -> Dict[str, str]:
        """The settings that differ from reading `text`/`messages` of split train."""
        out = {"split": self.split} if self.split != "train" else {}
        out.update({k: v for k, v in (("config", self.config), ("column", self.column),
                                      ("template", self.template)) if v is not None})
        return out

    def check(self, shown: str) -> None:
        if self.column is not None and self.template is not None:
            raise CalibrationError(
                f"calibration {shown} has both calibration_column and calibration_template; "
                "keep one")
        if self.template is not None:
            template_fields(self.template, shown)

    def fields(self, shown: str) -> Tuple[str, ...]:
        """The fields of a row this spec reads: ``text``/``messages``, or the column, or
        the template's fields."""
        if self.template is not None:
            return tuple(template_fields(self.template, shown))
        return (self.column,) if self.column is not None else ("text", "messages")

    def check_fields(self, columns: Optional[List[str]], shown: str) -> None:
        """Column and template fields against a dataset's columns, before reading rows."""
        if not columns:
            return  # unknown before the first row: checked row by row
        wanted = ([self.column] if self.column is not None else []) + (
            template_fields(self.template, shown) if self.template is not None else [])
        for name in wanted:
            if name not in columns:
                uses, fix = (("", "calibration_column") if name == self.column
                             else (", which calibration_template uses", "the template"))
                raise CalibrationError(
                    f"calibration dataset {shown} has no column '{name}'{uses} (columns: "
                    f"{', '.join(map(str, columns))}); fix {fix}")

    def record(self, row: Dict[str, Any], where: str) -> Dict[str, Any]:
        """The row as a calibration record: its column, its template filled, or itself."""
        if self.template is not None:
            try:
                return {"text": self.template.format_map(row)}
            except KeyError as e:
                raise CalibrationError(
                    f"{where} has no field {e.args[0]!r} for calibration_template (fields: "
                    f"{_fields(row)}); fix the template") from None
            except (ValueError, TypeError, IndexError, AttributeError, MemoryError, OverflowError) as e:
                raise CalibrationError(
                    f"{where}: calibration_template {self.template!r} cannot be filled from this "
                    f"row ({type(e).__name__}: {one_line(str(e))}); fix the template") from None
        if self.column is None:
            return row
        if self.column not in row:
            raise CalibrationError(
                f"{where} has no field '{self.column}' (fields: {_fields(row)}); fix "
                "calibration_column")
        value = row[self.column]
        if isinstance(value, list):
            return {"messages": value}
        if isinstance(value, str) or value is None:
            return {"text": value or ""}
        raise CalibrationError(
            f"{where}: calibration_column '{self.column}' holds a {type(value).__name__}, "
            "not text or a list of chat messages")


def _fields(row: Mapping) -> str:
    return ", ".join(sorted(map(str, row))[:8]) or "none"


def template_fields(template: str, shown: str) -> List[str]:
    """The field names a template uses; one clear error for a malformed one."""
    bad = f"calibration_template {template!r} (calibration {shown})"
    try:
        parts = [(f, conv) for _, f, _, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise CalibrationError(
            f"{bad} is not a valid format string ({e}); write fields as {{name}} and double "
            "literal braces") from None
    for field_name, conversion in parts:
        if conversion not in (None, "s", "r", "a"):
            raise CalibrationError(f"{bad} has an unknown conversion !{conversion} in "
                                   f"{{{field_name}!{conversion}}}; drop it (or use !s or !r)")
        if "." in re.split(r"\[", field_name, maxsplit=1)[0]:
            # a str's method or attribute, not a column: its repr would become the text
            raise CalibrationError(f"{bad} reads an attribute ({{{field_name}}}); name columns "
                                   "only, as in {question} (an index, as in {turns[0]}, is fine)")
    names = [f for f, _ in parts]
    roots = [re.split(r"[.\[]", f, maxsplit=1)[0] for f in names]
    if any(not r or r.isdigit() for r in roots):
        raise CalibrationError(
            f"calibration_template {template!r} (calibration {shown}) has a positional "
            "field; name every field, as in {question}")
    if not roots:
        raise CalibrationError(
            f"calibration_template {template!r} (calibration {shown}) uses no field; write "
            "the fields of a row as in {question}")
    return list(dict.fromkeys(roots))


# ------------------------------------------------------------ which sources are datasets
def _local(source: str) -> str:
    return os.path.abspath(os.path.expanduser(source))


def is_repository(path: str) -> bool:
    """A downloaded dataset repository: a folder with a dataset card, not a save_to_disk folder."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "README.md"))
            and not any(os.path.isfile(os.path.join(path, m)) for m in _SAVED_MARKERS))


def is_hub_id(source: str) -> bool:
    """``org/name`` that is no local path: a dataset on the Hugging Face Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.count("/") != 1 or source.lower().endswith(FILE_SUFFIXES) or os.path.exists(
            _local(source)):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def is_dataset(source: str) -> bool:
    return is_hub_id(source) or is_repository(_local(source))


# ------------------------------------------------------------ reading
@dataclass
class OpenedDataset:
    rows: Iterator[Tuple[str, Dict[str, Any]]]  # ("row 3", the row), in dataset order
    origin: Dict[str, Any]  # what the report and the card say about the source


def open_dataset(source: str, spec: RecordSpec, shown: str) -> OpenedDataset:
    """The rows of a Hub dataset or a repository folder, streamed; clear errors otherwise."""
    local = _local(source)
    path = local if is_repository(local) else source
    builder = _builder(path, spec, shown)
    splits = list(builder.info.splits or builder.config.data_files or [])
    if splits and spec.split not in splits:
        raise CalibrationError(
            f"calibration dataset {shown} has no split '{spec.split}'; set calibration_split "
            f"to one of: {', '.join(splits)}")
    try:
        stream = builder.as_streaming_dataset(split=spec.split)
    except Exception as e:
        raise CalibrationError(f"calibration dataset {shown} could not be opened "
                               f"({first_line(e)})") from None
    spec.check_fields(stream.column_names, shown)
    if path == local:
        name, revision = _repository_origin(local)
    else:
        name, revision = source, builder.hash  # a Hub builder's hash is the commit it read
    origin = {"dataset": name, "revision": revision, "split": spec.split}
    origin.update({k: v for k, v in spec.described().items() if k != "split"})
    return OpenedDataset(_rows(stream, shown), origin)


def _builder(path: str, spec: RecordSpec, shown: str):
    import datasets

    try:
        return datasets.load_dataset_builder(path, name=spec.config)
    except ValueError as e:  # a config that is missing or not there
        configs = _config_names(path)
        if configs and spec.config not in configs:
            what = (f"has no config '{spec.config}'" if spec.config is not None
                    else "has several configs")
            raise CalibrationError(
                f"calibration dataset {shown} {what}; set calibration_config to one of: "
                f"{', '.join(configs)}") from None
        raise CalibrationError(f"calibration dataset {shown} could not be opened "
                               f"({first_line(e)})") from None
    except ConnectionError as e:
        raise CalibrationError(
            f"calibration {shown} is not a local file or folder, and the Hugging Face Hub "
            f"could not provide it ({first_line(e)}); fix the name, or load it once online "
            "so that the datasets cache holds it") from None
    except Exception as e:  # not found on the Hub, gated, no data files, ...
        raise CalibrationError(f"calibration dataset {shown} could not be opened "
                               f"({first_line(e)})") from None


def _config_names(path: str) -> List[str]:
    import datasets

    try:
        return list(datasets.get_dataset_config_names(path))
    except Exception:
        return []


def _rows(stream, shown: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    rows = iter(stream)
    number = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a broken shard, a dropped connection
            raise CalibrationError(f"calibration dataset {shown} could not be read "
                                   f"({first_line(e)})") from None
        number += 1
        yield f"row {number}", row




def _repository_origin(path: str) -> Tuple[str, Optional[str]]:
    """The Hub id and commit of a downloaded repository, as far as the folder tells them."""
    parts = path.split(os.sep)
    # huggingface_hub's cache: .../datasets--org--name/snapshots/<commit>
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("datasets--"):
        return parts[-3][len("datasets--"):].replace("--", "/", 1), parts[-1]
    # `hf download --local-dir`: the commit is the first line of each
    # file's metadata under .cache/huggingface/download/
    meta = os.path.join(path, ".cache", "huggingface", "download", "README.md.metadata")
    revision = None
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as fp:
            revision = fp.readline().strip() or None
    return os.path.basename(path), revision


# ------------------------------------------------------------ resume fingerprints
def source_stamp(source: str) -> Optional[str]:
    """What a resumed merge compares to know the calibration data did not change."""
    local = _local(source)
    if is_repository(local):
        # names, sizes and times, as for models: hashing a large download costs a full read
        entries = []
        for root, dirs, files in os.walk(local):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                entries.append((os.path.relpath(os.path.join(root, f), local), st.st_size,
                                st.st_mtime_ns))
        return sha256_json(entries)
    if is_hub_id(source):
        return _hub_stamp(source)
    return data_sha256(source)


def _hub_stamp(repo_id: str) -> Optional[str]:
    import datasets
    from datasets.naming import camelcase_to_snakecase

    if datasets.config.HF_HUB_OFFLINE:
        # offline, datasets reads its cache: every cached (config, version, commit) of the repo
        namespace, name = repo_id.split("/")
        root = os.path.join(str(datasets.config.HF_DATASETS_CACHE),
                            f"{namespace}___{camelcase_to_snakecase(name)}")
        cached = sorted(os.path.relpath(p, root)
                        for p in glob.glob(os.path.join(root, "*", "*", "*")) if os.path.isdir(p))
        return "cache " + sha256_json(cached)
    from huggingface_hub import HfApi

    try:
        return "revision " + HfApi().dataset_info(repo_id).sha
    except Exception:
        return None  # unreachable: the calibration check names the problem
