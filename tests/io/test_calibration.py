"""Calibration sources load through `datasets`, in file order, padding masked."""

import json

import datasets
import pytest
import torch

from mergekit_com.io.calibration import (
    CalibrationError,
    load_calibration,
    make_batches,
)
from tests.support import pico
from tests.support.records import load_records


@pytest.fixture(scope="module")
def tok():
    return pico.make_tokenizer()


def test_jsonl_text_and_messages(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"text": "abc"}, {"messages": [{"role": "user", "content": "hi"}]}, {"text": "zz"},
    ]))
    cal = load_calibration(str(p), tok, num_samples=2, max_seq_len=512)
    assert cal.num_records == 2
    assert cal.sequences[0] == tok("abc")["input_ids"]
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert cal.sequences[1] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert len(cal.sha256) == 64


def test_txt_parquet_and_saved_dataset_agree(tmp_path, tok):
    lines = ["first line", "", "second", "third one"]
    (tmp_path / "d.txt").write_text("\n".join(lines))
    ds = datasets.Dataset.from_dict({"text": [l for l in lines if l]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    got = [load_records(str(tmp_path / name), 10)
           for name in ("d.txt", "d.parquet", "saved")]
    assert all([r["text"] for r in g] == ["first line", "second", "third one"] for g in got)


def test_truncation_and_padding_mask(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "x" * 50}) + "\n" + json.dumps({"text": "ab"}) + "\n")
    cal = load_calibration(str(p), tok, num_samples=8, max_seq_len=10)
    assert [len(s) for s in cal.sequences] == [10, 3]
    (ids, mask), = make_batches(cal.sequences, batch_size=8, pad_id=0)
    assert ids.shape == (2, 10)
    assert mask.sum().item() == 13 and mask[1, 3:].sum() == 0
    assert torch.equal(ids[1, :3], torch.tensor(cal.sequences[1]))


def test_batches_hold_each_sequence_then_padding():
    seqs = [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14]]
    (ids, mask), = make_batches(seqs, batch_size=4, pad_id=3)
    assert ids.tolist() == [[7, 8, 9, 10], [12, 13, 14, 3], [5, 6, 3, 3], [11, 3, 3, 3]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_batches_group_sequences_of_similar_length():
    seqs = [[1] * n for n in (3, 9, 4, 8, 3, 9)]
    batches = make_batches(seqs, batch_size=2, pad_id=0)
    assert [tuple(ids.shape) for ids, _ in batches] == [(2, 9), (2, 8), (2, 3)]
    assert sum(int(m.sum()) for _, m in batches) == sum(map(len, seqs))
    padded = sum(m.numel() - int(m.sum()) for _, m in batches)
    assert padded == 4  # the 4 beside the 8; in file order: 6 + 4 + 6 = 16


def test_missing_field_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n\n{"prompt": "no text"}\n')
    with pytest.raises(CalibrationError, match="line 3 has neither"):
        load_records(str(p), 10)


def test_json_array_record_without_text_names_the_record(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"text": "ok"}, {"prompt": "no text"}]')
    with pytest.raises(CalibrationError, match="record 2 has neither"):
        load_records(str(p), 10)


@pytest.mark.parametrize("name, content, message", [
    ("d.json", '[{"text": "a"},\n {"text": }]', r"is not valid JSON \(line 2, column 11"),
    ("d.json", '{"text": "a"} trailing', "not valid JSON"),
    ("d.txt", b"\xff\xfe not utf-8", "is not valid UTF-8 text"),
    ("d.jsonl", b'{"text": "\xff"}', "line 1 is not valid UTF-8 text"),
    ("d.jsonl", '["a list"]', "line 1 is a JSON list, not an object"),
    ("d.jsonl", '{"text": 5}', "line 1: `text` must be a string, not int"),
    ("d.jsonl", '{"messages": "hi"}', "line 1: `messages` must be a list of"),
    ("d.jsonl", '{"text": "  "}\n\n', "holds no text: all 1 records are blank"),
    ("d.csv", "text\nabc\n", "unsupported extension '.csv'"),
])
def test_malformed_files_give_one_clear_error(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CalibrationError, match=message):
        load_records(str(p), 10)


def test_short_records_share_a_batch_up_to_batch_size_full_length_sequences():
    # batch_size 2 at max_seq_len 9: 18 positions a batch, whatever the records' length
    full = make_batches([[1] * 9] * 5, batch_size=2, pad_id=0, max_tokens=18)
    assert [tuple(ids.shape) for ids, _ in full] == [(2, 9), (2, 9), (1, 9)]
    short = make_batches([[1] * 3] * 10, batch_size=2, pad_id=0, max_tokens=18)
    assert [tuple(ids.shape) for ids, _ in short] == [(6, 3), (4, 3)]


def test_an_empty_parquet_file_is_one_line_without_the_librarys_logs(tmp_path, tok, capfd):
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "none.parquet"))
    capfd.readouterr()
    with pytest.raises(CalibrationError) as e:
        load_calibration(str(tmp_path / "none.parquet"), tok, num_samples=4, max_seq_len=16)
    assert "none.parquet" in str(e.value) and "BatchSize" not in str(e.value)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", captured


def test_a_null_or_blank_text_is_a_blank_record_or_gives_way_to_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    chat = [{"role": "user", "content": "hi"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": None}, {"text": "", "messages": chat}, {"text": None, "messages": chat},
        {"text": "abc"}]))
    got = load_records(str(p), 10)
    assert got == [{"text": "", "messages": chat}, {"text": None, "messages": chat}, {"text": "abc"}]
    p.write_text(json.dumps({"text": None}) + "\n")
    with pytest.raises(CalibrationError, match="holds no text: all 1 records are blank"):
        load_records(str(p), 10)


def test_a_byte_order_mark_starts_no_txt_record(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes("\ufefffirst\nsecond\n".encode("utf-8"))
    assert [r["text"] for r in load_records(str(p), 10)] == ["first", "second"]


def test_a_lone_surrogate_is_named_not_a_tokenizer_type_error(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(CalibrationError, match=r"line 2 holds '\\ud800' at character 1, half of "
                                               r"a UTF-16 surrogate pair"):
        load_calibration(str(p), tok, num_samples=4, max_seq_len=16)


def test_saved_datasets_honour_split_and_config_or_say_why_not(tmp_path):
    from mergekit_com.io.datasets_source import RecordSpec

    rows = {"text": ["a", "b"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict({"text": ["v"]})}
                         ).save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "none"))
    assert [r["text"] for r in load_records(str(tmp_path / "one"), 10)] == ["a", "b"]
    assert [r["text"] for r in load_records(str(tmp_path / "dict"), 10,
                                            spec=RecordSpec(split="validation"))] == ["v"]
    with pytest.raises(CalibrationError, match="holds one saved split .* remove calibration_split"):
        load_records(str(tmp_path / "one"), 10, spec=RecordSpec(split="validation"))
    with pytest.raises(CalibrationError, match="has no configurations; remove calibration_config"):
        load_records(str(tmp_path / "dict"), 10, spec=RecordSpec(config="fr"))
    with pytest.raises(CalibrationError, match="none .*holds no text: it has no records"):
        load_records(str(tmp_path / "none"), 10)
    (tmp_path / "one" / "state.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="one is a saved dataset that could not be read"):
        load_records(str(tmp_path / "one"), 10)


def test_records_past_the_tokenizers_length_are_cut_without_its_warning(tmp_path):
    """transformers warns that a sequence longer than ``model_max_length`` will fail in the
    model; calibration records are cut at max_seq_len, so the warning would only mislead
    (it showed through --quiet)."""
    import logging

    import transformers

    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # as in a user's process
    logger.addHandler(handler)
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"text": "abcdefghij" * 3}) + "\n")
    try:
        tok = pico.make_tokenizer()
        tok.model_max_length = 8
        cal = load_calibration(str(p), tok, num_samples=1, max_seq_len=8)
        shown = pico.make_tokenizer()  # (a tokenizer warns once: another one for the control)
        shown.model_max_length = 8
        shown("abcdefghij" * 3)  # the warning this process gives, to show it is seen here
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)
    assert len(cal.sequences[0]) == 8
    assert sum("Token indices sequence length" in m for m in seen) == 1
