"""The slices example covers the tiny zoo's layers with every expert in every slice."""

import os

import yaml

from mergekit_com.zoo import get_preset
from tests.support.paths import REPO as ROOT


def test_slices_example_fits_the_tiny_zoo():
    path = os.path.join(ROOT, "example_configs", "tiny_zoo_com_slices.yml")
    cfg = yaml.safe_load(open(path))
    preset = get_preset("tiny")
    covered = []
    for s in cfg["slices"]:
        ranges = {tuple(src["layer_range"]) for src in s["sources"]}
        assert len(ranges) == 1
        covered.extend(range(*ranges.pop()))
        assert [src["model"] for src in s["sources"]] == [
            f"zoo_cache/tiny/expert_{t}" for t in preset.tasks]
        assert [src["parameters"]["calibration"] for src in s["sources"]] == [
            f"zoo_cache/tiny/data/{t}.calib.jsonl" for t in preset.tasks]
    assert covered == list(range(preset.num_layers))
