"""The README's parameter table, the docs' links and the example configs match the code."""

import glob
import os
import re

import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_com.integration.validation import check_parameter_names
from mergekit_com.method.parameters import PARAMETERS
from tests.support.paths import REPO as ROOT


def test_readme_parameter_table_is_the_code_s():
    """Every row: name, where it is set, default and meaning, exactly as PARAMETERS has them."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text.split("## YAML reference", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \| .*\|$", table, flags=re.M)}
    assert set(rows) == set(PARAMETERS)
    for name, p in PARAMETERS.items():
        where = "per model" if p.per_model else "global"
        assert rows[name] == f"| `{name}` | {where} | `{p.default}` | {p.description} |", name


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


def test_readme_stays_a_users_first_page():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode()) <= 15_500, "move what a user does not need first into docs/"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:4] == ["Quickstart", "Three ways in", "YAML reference", "Using Chain of Merges"]


def _markdown_files():
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md"),
            *glob.glob(os.path.join(ROOT, "docs", "*.md")), os.path.join(ROOT, "tests", "README.md")]


def _anchors(path):
    text = open(path, encoding="utf-8").read()
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", _markdown_files(), ids=os.path.basename)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(path):
    text = open(path, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#")):
            continue
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), file))
        assert os.path.exists(full), f"{os.path.basename(path)} links to missing {target}"
        if anchor:
            assert anchor in _anchors(full), f"{os.path.basename(path)} links to missing {target}"


def test_example_configs_leave_the_method_settings_to_the_defaults():
    """The defaults are the best CoM we measured: no example should need to pick them."""
    for path in glob.glob(os.path.join(ROOT, "example_configs", "*.yml")):
        text = open(path, encoding="utf-8").read()
        for name in ("objective", "alpha", "blend"):
            assert not re.search(rf"^\s*{name}\s*:", text, flags=re.M), (path, name)
