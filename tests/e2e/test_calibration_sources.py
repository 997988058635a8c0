"""Merges calibrated on Hugging Face datasets: a downloaded repository, a cached Hub id, and
one source shared by every expert through the top-level `parameters:`."""

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions

from mergekit_com.integration.staged_merge import fingerprint
from tests.support.hub_datasets import cache_hub_dataset, write_repository
from tests.support.merging import com_config, experts, merge

COMMIT = "c0ffee" * 6 + "c0ff"


def _texts(path):
    with open(path) as fp:
        return [json.loads(line)["text"] for line in fp if line.strip()]


@pytest.fixture
def sources(zoo2, tmp_path, datasets_cache):
    """expert0's texts in a repository folder (field `body`); expert1's as the Hub dataset
    pico-org/split-text, each text cut in two fields that a template joins again."""
    first = [{"body": t, "id": i} for i, t in enumerate(_texts(zoo2["expert0_data"]))]
    repo = write_repository(str(tmp_path / "expert0-data"), {"train": first, "test": first[:2]})
    halves = [{"head": t[:len(t) // 2], "tail": t[len(t) // 2:]}
              for t in _texts(zoo2["expert1_data"])]
    hub = write_repository(str(tmp_path / "split-text"), {"train": halves}, fmt="jsonl")
    cache_hub_dataset(str(datasets_cache), "pico-org/split-text", hub, COMMIT)
    return repo


def _report(out):
    with open(os.path.join(out, "com_report.json")) as fp:
        return json.load(fp)


def test_datasets_merge_exactly_like_the_same_text_in_files(zoo2, tmp_path, sources):
    reference = merge(com_config(experts(zoo2)), str(tmp_path / "files"))
    models = [{"model": zoo2["expert0"], "calibration": sources, "calibration_column": "body"},
              {"model": zoo2["expert1"], "calibration": "pico-org/split-text",
               "calibration_template": "{head}{tail}"}]
    out = tmp_path / "datasets"
    merged = merge(com_config(models), str(out))
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    first, second = (e["calibration"] for e in _report(out)["experts"])
    assert first == {"dataset": "expert0-data", "revision": None, "split": "train",
                     "column": "body", "samples": 12, "tokens": first["tokens"]}
    assert second == {"dataset": "pico-org/split-text", "revision": COMMIT, "split": "train",
                      "template": "{head}{tail}", "samples": 12, "tokens": second["tokens"]}
    text = ModelCard.load(out / "README.md").text
    assert (f"| [`pico-org/split-text`](https://huggingface.co/datasets/pico-org/split-text), "
            f"split `train`, template `{{head}}{{tail}}` | 12 | {second['tokens']} | "
            f"revision `{COMMIT}` |") in text
    assert "shared one calibration source" not in text


def test_top_level_calibration_is_every_experts_default(zoo2, tmp_path, sources):
    shared = dict(calibration="pico-org/split-text", calibration_template="{head}{tail}")
    per_model = merge(com_config([{"model": zoo2[f"expert{i}"], **shared} for i in range(2)]),
                      str(tmp_path / "each"))
    out = tmp_path / "default"
    default = merge(com_config([{"model": zoo2["expert0"]}, {"model": zoo2["expert1"]}], **shared),
                    str(out))
    assert all(torch.equal(default[k], per_model[k]) for k in per_model)
    report = _report(out)
    assert [e["calibration"]["dataset"] for e in report["experts"]] == ["pico-org/split-text"] * 2
    assert "All 2 experts shared one calibration source." in ModelCard.load(out / "README.md").text
    # an expert's own calibration overrides the default; each setting resolves on its own,
    # as every mergekit parameter does, so "" clears the shared template
    out = tmp_path / "override"
    merge(com_config([{"model": zoo2["expert0"], "calibration": zoo2["expert0_data"],
                       "calibration_template": ""},
                      {"model": zoo2["expert1"]}], **shared), str(out))
    first, second = (e["calibration"] for e in _report(out)["experts"])
    assert first["file"] == os.path.basename(zoo2["expert0_data"]) and "template" not in first
    assert second["dataset"] == "pico-org/split-text"
    assert "shared one calibration source" not in ModelCard.load(out / "README.md").text


def test_resume_refuses_a_hub_dataset_that_changed(zoo2, sources, datasets_cache, tmp_path):
    config = MergeConfiguration.model_validate(com_config(
        [{"model": zoo2["expert0"]}, {"model": zoo2["expert1"]}],
        calibration="pico-org/split-text"))
    before = fingerprint(config, MergeOptions(), {})
    assert fingerprint(config, MergeOptions(), {}) == before
    # a newer revision of the dataset reaches the cache between two runs
    cache_hub_dataset(str(datasets_cache), "pico-org/split-text", str(tmp_path / "split-text"),
                      "e" * 40)
    assert fingerprint(config, MergeOptions(), {})["calibration"] != before["calibration"]
