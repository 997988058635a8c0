"""The README's parameter table and the example configs match the code."""

import glob
import os
import re

import yaml

from mergekit.config import MergeConfiguration
from mergekit_com.adapter import check_parameter_names
from mergekit_com.method import PARAMETERS

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_readme_documents_every_parameter_with_its_default():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| `([^`]*)` \|", text, flags=re.M))
    assert set(rows) == set(PARAMETERS)
    for name, (_ty, _scope, default, _desc) in PARAMETERS.items():
        assert rows[name] == str(default), name


def test_example_configs_are_valid_chain_of_merges_configs():
    paths = glob.glob(os.path.join(ROOT, "example_configs", "*.yml"))
    assert paths
    for path in paths:
        config = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
        assert config.merge_method == "chain_of_merges"
        check_parameter_names(config)


def test_zoo_example_config_merges_every_tiny_task():
    from mergekit_com.zoo import get_preset

    cfg = yaml.safe_load(open(os.path.join(ROOT, "example_configs", "tiny_zoo_com.yml")))
    tasks = get_preset("tiny").tasks
    assert [m["model"] for m in cfg["models"]] == [f"zoo_cache/tiny/expert_{t}" for t in tasks]
    assert [m["parameters"]["calibration"] for m in cfg["models"]] == [
        f"zoo_cache/tiny/data/{t}.calib.jsonl" for t in tasks]
