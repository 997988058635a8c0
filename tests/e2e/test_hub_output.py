"""The output folder is what the Hub expects, and its model card describes the CoM merge."""

import hashlib
import os

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from mergekit_com.integration.card import BIBTEX
from tests.support.merging import com_config, experts, merge

# what `huggingface-cli upload` should find in a merged model's folder
EXPECTED = {"README.md", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "mergekit_config.yml", "com_report.json"}
ALLOWED = EXPECTED | {"chat_template.jinja", "special_tokens_map.json"}


def assert_valid_metadata(card: ModelCard) -> dict:
    """What the Hub checks on upload, done offline."""
    data = card.data.to_dict()
    ModelCardData(**data)  # round-trips through huggingface_hub's own model
    assert data["library_name"] == "transformers"
    assert isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])
    for repo in data.get("base_model") or []:
        validate_repo_id(repo)
    return data


@pytest.fixture(scope="module")
def out(zoo2, tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "my-com-merge"
    merge(com_config(experts(zoo2), alpha=[{"filter": "mlp", "value": 0.8}, {"value": 0.9}]),
          str(path))
    return path


def test_folder_is_upload_ready(out):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    files = set(os.listdir(out))
    assert EXPECTED <= files <= ALLOWED, files ^ EXPECTED
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2


def test_card_front_matter_and_com_section(zoo2, out):
    card = ModelCard.load(out / "README.md")
    data = assert_valid_metadata(card)
    assert {"mergekit", "merge", "chain-of-merges"} <= set(data["tags"])
    assert not data.get("base_model")  # local inputs have no Hub id
    text = card.text
    assert "https://arxiv.org/abs/2508.21421" in text and BIBTEX in text
    assert "| `chain` | `module` |" in text
    assert "| `alpha` | per tensor: `0.8`, `0.9` |" in text
    for i in range(2):
        path = zoo2[f"expert{i}_data"]
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        row = next(l for l in text.splitlines() if l.startswith(f"| {zoo2[f'expert{i}']} |"))
        assert f"`{os.path.basename(path)}`" in row and f"`{sha}`" in row and "| 12 |" in row
    # mergekit's own parts are kept
    assert "### Configuration" in text and "chain_of_merges" in text


def test_card_lists_hub_inputs_as_base_models():
    """With Hub ids (no download: generate_card only reads the configuration)."""
    from mergekit.config import MergeConfiguration

    from mergekit_com.integration.card import card_markdown

    cfg = com_config([{"model": "pico-org/expert-a", "calibration": "a.jsonl"},
                      {"model": "pico-org/expert-b+pico-org/lora-b", "calibration": "b.jsonl"}],
                     base="pico-org/base")
    config = MergeConfiguration.model_validate(cfg)
    card = ModelCard(card_markdown(config, yaml.safe_dump(cfg), name="x"))
    data = assert_valid_metadata(card)
    assert sorted(data["base_model"]) == ["pico-org/base", "pico-org/expert-a",
                                          "pico-org/expert-b", "pico-org/lora-b"]
    assert "chain-of-merges" in data["tags"] and BIBTEX in card.text


def test_other_methods_keep_mergekits_card():
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(
        {"merge_method": "linear", "models": [{"model": "pico-org/a", "parameters": {"weight": 1.0}}]})
    text = generate_card(config, "", name="x")
    assert "chain-of-merges" not in text and "Chain of Merges" not in text
