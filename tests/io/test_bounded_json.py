"""A record of any size costs memory for what max_seq_len keeps, not for its size."""

import json

import pytest

from mergekit_com.io.datasets_source import RecordSpec
from mergekit_com.io.calibration import (
    CalibrationError,
    load_labeled,
    record_budget,
    tokenize_records,
)


def test_a_long_line_is_cut_as_it_is_read_and_the_rest_still_parse(tmp_path):
    budget = record_budget(8)
    p = tmp_path / "d.jsonl"
    long = "é" * (20 * budget)
    rows = [{"meta": {"x": [1, 2, "y" * 10 * budget]}, "text": long, "id": 3},
            {"messages": [{"role": "user", "content": "a" * 30 * budget}] * 3},
            {"text": "short"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [row for _, row in load_labeled(str(p), 10, max_seq_len=8)[0]]
    assert got[0]["text"] == long[:len(got[0]["text"])] and 0 < len(got[0]["text"]) <= budget
    assert set(got[0]) == {"meta", "text", "id"}  # other fields: names only, for messages
    assert sum(len(m["content"]) for m in got[1]["messages"]) <= budget
    assert got[2] == {"text": "short"}
    assert [row for _, row in load_labeled(str(p), 10)[0]] == rows  # no max_seq_len: whole


def test_a_large_json_array_is_streamed_with_the_same_records(tmp_path):
    budget = record_budget(4)
    rows = [{"text": f"record {i} " + "x" * 50} for i in range(2000)]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows))
    assert p.stat().st_size > 8 * budget  # too large to read whole with this max_seq_len
    got = [row for _, row in load_labeled(str(p), 2000, max_seq_len=4)[0]]
    assert got == rows


@pytest.mark.parametrize("spec", [RecordSpec(column="question"),
                                  RecordSpec(template="Q: {question} A: {answer}"),
                                  RecordSpec(column="chat")])
@pytest.mark.parametrize("shape", ["json", "jsonl"])
def test_records_read_in_bounds_keep_the_fields_a_column_or_template_reads(tmp_path, spec, shape):
    """A .json file or a .jsonl line too large to read whole gives the same records as a
    small one: the fields a column or template names are kept, not only text/messages."""
    rows = [{"question": f"what is {i}?", "answer": f"{i}", "id": i,
             "chat": [{"role": "user", "content": f"hi {i}"}], "pad": "p" * 2000} for i in range(400)]
    small, large = tmp_path / f"small.{shape}", tmp_path / f"large.{shape}"
    for path, n in ((small, 3), (large, 400)):
        if shape == "json":
            path.write_text(json.dumps(rows[:n]))
        else:
            path.write_text("".join(json.dumps({**r, "pad": r["pad"] * (60 if path is large else 0)})
                                    + "\n" for r in rows[:n]))
    cap = 8 * record_budget(8)
    assert large.stat().st_size > cap > small.stat().st_size  # the bounded reader's path
    want = [r for _, r in load_labeled(str(small), 3, spec=spec)[0]]
    got = [r for _, r in load_labeled(str(large), 3, spec=spec, max_seq_len=8)[0]]
    assert got == want and " 0" in str(want[0])


@pytest.mark.parametrize("line", [
    '{"text": "first", "text": "second"}',  # a repeated key: the last one, as json.loads
    '{"text": "abc", "score": NaN, "hi": -Infinity}',  # json.loads' non-standard numbers
    "   \t ",  # a blank line is skipped
])
def test_a_long_line_reads_as_the_same_line_short(tmp_path, line):
    pad = " " * (9 * record_budget(8))  # whitespace: the same JSON, too long to read whole
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text(line + "\n" + '{"text": "next"}\n')
    long.write_text(line + pad + "\n" + '{"text": "next"}\n')
    got, want = (load_labeled(str(p), 10, **kw)[0] for p, kw in ((long, {"max_seq_len": 8}), (short, {})))
    assert [(w, r.get("text"), set(r)) for w, r in got] == [(w, r.get("text"), set(r)) for w, r in want]


@pytest.mark.parametrize("text, problem", [
    ('{"text": "' + "a" * 600000 + '"', "Expecting ',' delimiter"),
    ('{"text": "' + "a" * 600000, "Invalid control character"),
    ('{"text": "' + "a" * 600000 + '"} {', "Extra data"),
    ('{"text": "' + "a" * 600000 + '\\q"}', "Invalid \\\\escape"),
])
def test_a_malformed_long_line_names_its_line(tmp_path, text, problem):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n' + text + "\n")
    with pytest.raises(CalibrationError, match=rf"line 2 is not valid JSON \({problem}"):
        load_labeled(str(p), 10, max_seq_len=8)


def test_a_long_txt_line_is_cut_too(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("z" * 10**6 + "\nsecond\n")
    got = [row["text"] for _, row in load_labeled(str(p), 10, max_seq_len=8)[0]]
    assert got == ["z" * record_budget(8), "second"]


class Spy:
    """A tokenizer that records what it was given."""

    def __init__(self):
        self.seen = []

    def __call__(self, text, **kwargs):
        self.seen.append(len(text))
        return {"input_ids": list(range(len(text)))}


def test_only_the_budget_is_tokenized():
    spy = Spy()
    seqs = tokenize_records([("line 1", {"text": "w " * 10**6})], spy, 16, "d.jsonl")
    assert spy.seen == [record_budget(16)] and seqs == [list(range(16))]
