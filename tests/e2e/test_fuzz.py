"""Property-based tests: whatever the input, only the project's own clear errors.

The calibration loader gets arbitrary bytes, JSON of every shape, unicode and
long lines; the command gets arbitrary parameter settings and arbitrary
config text. The loader may only return a calibration set or raise
CalibrationError; mergekit-com may only merge or exit 2 with one line.
Example counts are small: these run in the default suite.
"""

import json
import os
import shutil
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_com import cli
from mergekit_com.integration import chain_task
from mergekit_com.io.calibration import CalibrationError, load_calibration
from mergekit_com.method.parameters import PARAMETERS, Chain, Fallback, Objective
from tests.support import pico
from tests.support.bad_inputs import World

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(st.fixed_dictionaries({"role": st.text(max_size=8), "content": st.text()}),
                    max_size=3)
records = st.one_of(
    st.fixed_dictionaries({"text": st.text()}),
    st.fixed_dictionaries({"messages": messages}),
    st.dictionaries(st.sampled_from(["text", "messages", "prompt"]), json_values, max_size=3),
    json_values,
)


@pytest.fixture(scope="module")
def tok():
    return pico.make_tokenizer()


@pytest.fixture(scope="module")
def scratch():
    path = tempfile.mkdtemp(prefix="fuzz-")
    yield path
    shutil.rmtree(path)


def load_or_clear_error(path, tok, num_samples=4, max_seq_len=16):
    try:
        cal = load_calibration(path, tok, num_samples=num_samples, max_seq_len=max_seq_len)
    except CalibrationError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert cal.sequences and all(0 < len(s) <= max_seq_len for s in cal.sequences)
    return cal


@FAST
@given(data=st.binary(max_size=300), ext=st.sampled_from([".jsonl", ".json", ".txt", ".parquet"]))
def test_arbitrary_bytes(scratch, tok, data, ext):
    path = os.path.join(scratch, "bytes" + ext)
    with open(path, "wb") as fp:
        fp.write(data)
    load_or_clear_error(path, tok)


@FAST
@given(rows=st.lists(records, max_size=5), blank_lines=st.booleans())
def test_json_lines_of_any_shape(scratch, tok, rows, blank_lines):
    path = os.path.join(scratch, "shapes.jsonl")
    sep = "\n\n" if blank_lines else "\n"
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(sep.join(json.dumps(r) for r in rows))
    load_or_clear_error(path, tok)


@FAST
@given(value=json_values | st.lists(records, max_size=4))
def test_json_file_of_any_shape(scratch, tok, value):
    path = os.path.join(scratch, "shape.json")
    with open(path, "w", encoding="utf-8") as fp:
        json.dump(value, fp)
    load_or_clear_error(path, tok)


@settings(FAST, max_examples=6)
@given(length=st.integers(10_000, 300_000), char=st.characters())
def test_huge_lines_are_truncated(scratch, tok, length, char):
    path = os.path.join(scratch, "huge.jsonl")
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(json.dumps({"text": char * length}) + "\n")
    load_or_clear_error(path, tok)


# ------------------------------------------------------------------ config checks

scalars = st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats() | st.text(max_size=6)
junk = (
    scalars
    | st.lists(scalars, max_size=3)
    | st.lists(st.fixed_dictionaries({"value": scalars | st.lists(scalars, max_size=2)},
                                     optional={"filter": st.sampled_from(["mlp", "self_attn", "*"])}),
               max_size=2)
)
# Values close to valid ones reach the deeper checks (ranges, calibration, ...).
numbers = st.floats(-0.5, 1.5) | st.integers(-2, 40) | st.sampled_from([float("nan"), float("inf")])
words = st.sampled_from(tuple(e.value for enum in (Chain, Objective, Fallback) for e in enum) + ("e0.jsonl", "missing.jsonl", "notds", ""))
plausible = (
    numbers
    | words
    | st.lists(numbers, max_size=3)
    | st.lists(st.fixed_dictionaries({"value": numbers | words},
                                     optional={"filter": st.sampled_from(["mlp", "self_attn"])}),
               min_size=1, max_size=2)
)
parameter_maps = (
    st.dictionaries(st.sampled_from(sorted(PARAMETERS)), plausible, max_size=3)
    | st.dictionaries(st.sampled_from(sorted(PARAMETERS)) | st.text(min_size=1, max_size=8), junk,
                      max_size=2)
)


class Validated(BaseException):
    """Raised where the merge would start: every check has passed."""


@pytest.fixture(scope="module")
def world(zoo2, tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("fuzz_world")), zoo2)


@pytest.fixture
def stop_before_merging(world, monkeypatch):
    monkeypatch.chdir(world.root)

    def run_chain(*_args, **_kwargs):
        raise Validated

    monkeypatch.setattr(chain_task, "run_chain", run_chain)
    return world


def run_command(world, text, capsys):
    """mergekit-com on a config text: exits 2 with one line, or passes every check."""
    path = os.path.join(world.root, "fuzz.yml")
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(text)
    capsys.readouterr()
    try:
        cli.main([path, "fuzz-out", "--quiet"])
    except Validated:
        return
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        assert e.code == 2 and len(err) == 1 and err[0].startswith("mergekit-com: error: "), err
    assert not os.path.exists(os.path.join(world.root, "fuzz-out"))
    assert not os.path.exists(os.path.join(world.root, "fuzz-out.com-work"))


@settings(FAST, max_examples=60)
@given(top=parameter_maps, per_model=parameter_maps)
def test_any_parameters(stop_before_merging, capsys, top, per_model):
    cfg = {
        "merge_method": "chain_of_merges",
        "models": [
            {"model": "./expert0", "parameters": {"calibration": "e0.jsonl"}},
            {"model": "./expert1", "parameters": {"calibration": "e1.jsonl", **per_model}},
        ],
        "parameters": top,
        "dtype": "float32",
    }
    run_command(stop_before_merging, yaml.safe_dump(cfg), capsys)


@settings(FAST, max_examples=30)
@given(text=st.text(max_size=200) | st.builds(yaml.safe_dump, json_values))
def test_any_config_text(stop_before_merging, capsys, text):
    run_command(stop_before_merging, text, capsys)
