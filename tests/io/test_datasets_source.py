"""Calibration from Hugging Face datasets, offline: downloaded repositories and cached Hub ids."""

import glob
import json
import os

import datasets
import pytest

from mergekit_com.io.calibration import CalibrationError, load_calibration
from mergekit_com.io.datasets_source import RecordSpec, is_hub_id, source_stamp
from tests.support import pico
from tests.support.hub_datasets import cache_hub_dataset, qa_rows, write_repository
from tests.support.records import load_records

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def repo(tmp_path, datasets_cache):
    return write_repository(str(tmp_path / "qa"), {"train": qa_rows(10), "test": qa_rows(3, "t")})


def texts(records):
    return [r["text"] for r in records]


def test_repository_folder_with_a_column_and_a_template(repo):
    rows = qa_rows(10)
    got = load_records(repo, 4, RecordSpec(column="question"))
    assert texts(got) == [r["question"] for r in rows[:4]]
    got = load_records(repo, 3, RecordSpec(template="Q: {question}\nA: {answer}"))
    assert texts(got) == [f"Q: {r['question']}\nA: {r['answer']}" for r in rows[:3]]
    got = load_records(repo, 10, RecordSpec(split="test", column="question"))
    assert texts(got) == [r["question"] for r in qa_rows(3, "t")]


def test_hub_id_from_the_offline_cache_records_its_revision(repo, datasets_cache):
    assert datasets.config.HF_HUB_OFFLINE  # conftest: nothing may reach the Hub
    cache_hub_dataset(str(datasets_cache), "pico-org/tiny-qa", repo, COMMIT)
    assert is_hub_id("pico-org/tiny-qa")
    cal = load_calibration("pico-org/tiny-qa", pico.make_tokenizer(), num_samples=5,
                           max_seq_len=64, spec=RecordSpec(template="{question} {answer}"))
    rows = qa_rows(10)[:5]
    tok = pico.make_tokenizer()
    assert cal.sequences == [tok(f"{r['question']} {r['answer']}")["input_ids"] for r in rows]
    assert cal.origin == {"dataset": "pico-org/tiny-qa", "revision": COMMIT, "split": "train",
                          "template": "{question} {answer}"}
    test_split = load_records("pico-org/tiny-qa", 10, RecordSpec(split="test", column="answer"))
    assert texts(test_split) == [r["answer"] for r in qa_rows(3, "t")]


def test_streaming_reads_only_the_shards_it_needs(tmp_path, datasets_cache):
    # 40 rows in 4 shards; the last shard is not parquet at all. Reading the first
    # 25 rows never opens it, and nothing is prepared into the cache.
    path = write_repository(str(tmp_path / "big"), {"train": qa_rows(40)}, shards=4)
    last = os.path.join(path, "data", "train-00003-of-00004.parquet")
    with open(last, "wb") as fp:
        fp.write(b"not a parquet file")
    got = load_records(path, 25, RecordSpec(column="question"))
    assert texts(got) == [r["question"] for r in qa_rows(40)[:25]]
    assert not glob.glob(os.path.join(datasets_cache, "**", "*.arrow"), recursive=True)
    with pytest.raises(CalibrationError, match=r"^calibration dataset .*big could not be read"):
        load_records(path, 35, RecordSpec(column="question"))


def test_jsonl_repository_with_chat_messages_renders_the_chat_template(tmp_path, datasets_cache):
    chats = [{"conversation": [{"role": "user", "content": f"hi {c}"},
                               {"role": "assistant", "content": c * 3}]} for c in "abc"]
    path = write_repository(str(tmp_path / "chat"), {"train": chats}, fmt="jsonl")
    tok = pico.make_tokenizer()
    cal = load_calibration(path, tok, num_samples=8, max_seq_len=128,
                           spec=RecordSpec(column="conversation"))
    rendered = [tok.apply_chat_template(c["conversation"], tokenize=False) for c in chats]
    assert cal.sequences == [tok(t, add_special_tokens=False)["input_ids"] for t in rendered]
    assert cal.origin["dataset"] == "chat" and cal.origin["revision"] is None


def test_downloaded_repository_keeps_its_hub_revision(tmp_path, datasets_cache):
    # what `huggingface-cli download --local-dir` leaves next to the files
    path = write_repository(str(tmp_path / "dl"), {"train": qa_rows(3)})
    meta = os.path.join(path, ".cache", "huggingface", "download")
    os.makedirs(meta)
    with open(os.path.join(meta, "README.md.metadata"), "w") as fp:
        fp.write(f"{COMMIT}\n\"etag\"\n1700000000.0\n")
    cal = load_calibration(path, pico.make_tokenizer(), 3, 64, spec=RecordSpec(column="answer"))
    assert cal.origin["revision"] == COMMIT
    # and huggingface_hub's own cache layout names the dataset too
    snapshot = tmp_path / "hub" / "datasets--pico-org--qa" / "snapshots" / COMMIT
    write_repository(str(snapshot), {"train": qa_rows(3)})
    cal = load_calibration(str(snapshot), pico.make_tokenizer(), 3, 64,
                           spec=RecordSpec(column="answer"))
    assert (cal.origin["dataset"], cal.origin["revision"]) == ("pico-org/qa", COMMIT)


def test_column_and_template_apply_to_local_files_too(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in qa_rows(4)))
    got = load_records(str(p), 4, RecordSpec(template="{answer}: {question}"))
    assert texts(got) == [f"{r['answer']}: {r['question']}" for r in qa_rows(4)]


@pytest.fixture
def two_configs(tmp_path, datasets_cache):
    return write_repository(str(tmp_path / "multi"), {}, configs={
        "en": {"train": qa_rows(3)}, "fr": {"train": qa_rows(3, "f")}})


def test_config_selects_the_subset(two_configs):
    got = load_records(two_configs, 3, RecordSpec(config="fr", column="question"))
    assert texts(got) == [r["question"] for r in qa_rows(3, "f")]


@pytest.mark.parametrize("spec, message", [
    (RecordSpec(split="validation", column="question"),
     "calibration dataset qa has no split 'validation'; set calibration_split to one of: "
     "train, test"),
    (RecordSpec(config="fr", column="question"),
     "calibration dataset qa has no config 'fr'; set calibration_config to one of: default"),
    (RecordSpec(column="answr"),
     r"calibration dataset qa has no column 'answr' \(columns: question, answer\); fix "
     "calibration_column"),
    (RecordSpec(template="{question} {answr}"),
     r"calibration dataset qa has no column 'answr', which calibration_template uses "
     r"\(columns: question, answer\); fix the template"),
    (RecordSpec(template="{question"),
     r"calibration_template '\{question' \(calibration qa\) is not a valid format string"),
    (RecordSpec(template="{} {0}"),
     r"calibration_template '\{\} \{0\}' \(calibration qa\) has a positional field; name "
     "every field"),
    (RecordSpec(column="question", template="{answer}"),
     "calibration qa has both calibration_column and calibration_template; keep one"),
    (RecordSpec(),
     r"calibration dataset qa: row 1 has neither a `text` nor a `messages` field \(fields "
     r"found: answer, question\); set calibration_column or calibration_template"),
])
def test_repository_mistakes_give_one_clear_line(repo, spec, message, monkeypatch):
    monkeypatch.chdir(os.path.dirname(repo))
    with pytest.raises(CalibrationError, match="^" + message):
        load_records("qa", 5, spec)


def test_a_dataset_with_several_configs_needs_one(two_configs, monkeypatch):
    monkeypatch.chdir(os.path.dirname(two_configs))
    with pytest.raises(CalibrationError, match="^calibration dataset multi has several configs; "
                                               "set calibration_config to one of: en, fr$"):
        load_records("multi", 3, RecordSpec(column="question"))


def test_hub_id_absent_from_the_offline_cache(datasets_cache):
    with pytest.raises(CalibrationError, match=r"^calibration pico-org/absent is not a local file "
                                               r"or folder, and the Hugging Face Hub could not"):
        load_records("pico-org/absent", 3)


@pytest.mark.parametrize("name, spec, message", [
    ("a.jsonl", RecordSpec(split="test"), "remove calibration_split"),
    ("a.jsonl", RecordSpec(config="x"), "remove calibration_config"),
    ("a.jsonl", RecordSpec(column="meta"), r"line 1: calibration_column 'meta' holds a dict"),
])
def test_file_mistakes_name_the_setting(tmp_path, name, spec, message):
    p = tmp_path / name
    p.write_text(json.dumps({"text": "abc", "meta": {"k": 1}}) + "\n")
    with pytest.raises(CalibrationError, match=message):
        load_records(str(p), 3, spec)


def test_saved_dataset_dict_reads_the_split_asked_for(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["tr"]}),
                              "val": datasets.Dataset.from_dict({"text": ["va"]})})
    d.save_to_disk(str(tmp_path / "saved"))
    assert texts(load_records(str(tmp_path / "saved"), 3, RecordSpec(split="val"))) == ["va"]
    with pytest.raises(CalibrationError, match="has no split 'test'; set calibration_split to "
                                               "one of: train, val"):
        load_records(str(tmp_path / "saved"), 3, RecordSpec(split="test"))


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("org/name.v2")
    assert not is_hub_id("data/math.jsonl")  # a missing file stays a file
    assert not is_hub_id("name") and not is_hub_id("a/b/c") and not is_hub_id("/org/name")
    os.makedirs("org/name")
    assert not is_hub_id("org/name")  # a local folder wins, as for mergekit's models


def test_resume_stamps_follow_the_data(repo, datasets_cache):
    before = source_stamp(repo)
    assert source_stamp(repo) == before
    with open(os.path.join(repo, "README.md"), "a") as fp:
        fp.write("one more line\n")
    assert source_stamp(repo) != before
    # offline, a Hub id is what the datasets cache holds of it
    empty = source_stamp("pico-org/tiny-qa")
    cache_hub_dataset(str(datasets_cache), "pico-org/tiny-qa", repo, COMMIT)
    first = source_stamp("pico-org/tiny-qa")
    cache_hub_dataset(str(datasets_cache), "pico-org/tiny-qa", repo, "f" * 40)
    assert len({empty, first, source_stamp("pico-org/tiny-qa")}) == 3


@pytest.mark.parametrize("template, says", [
    ("{question!z}", "unknown conversion !z"),
    ("{question.upper}", "reads an attribute ({question.upper})"),
])
def test_a_template_that_cannot_give_a_rows_text_is_named_before_reading(template, says):
    from mergekit_com.errors import CalibrationError
    from mergekit_com.io.datasets_source import template_fields

    with pytest.raises(CalibrationError) as e:
        template_fields(template, "qa.jsonl")
    assert str(e.value).startswith(f"calibration_template {template!r} (calibration qa.jsonl)")
    assert says in str(e.value)
    assert template_fields("{question} {turns[0]!r}", "qa.jsonl") == ["question", "turns"]
