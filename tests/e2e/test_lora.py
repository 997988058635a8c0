"""`model+adapter` references (PEFT LoRA), from plain folders and from HF-cache snapshots."""

import hashlib
import os

import pytest
import torch

from mergekit_com.errors import ChainConfigError
from tests.support.every_linear import assert_every_linear_is_closed_form
from tests.support.merging import com_config, merge

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora(zoo2, tmp_path_factory):
    """A random (non-zero) LoRA on expert0, and expert0 with it merged in, by PEFT itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(zoo2["expert0"])
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    peft.get_peft_model(model, config).save_pretrained(root / "adapter")  # no tokenizer
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(zoo2["expert0"]), root / "adapter").merge_and_unload()
    reference.save_pretrained(root / "reference")
    AutoTokenizer.from_pretrained(zoo2["expert0"]).save_pretrained(root / "reference")
    return {"adapter": str(root / "adapter"), "reference": str(root / "reference")}


def hf_cache_snapshot(src: str, cache: str, repo: str) -> str:
    """``src`` laid out as huggingface_hub caches a repo (blobs + symlinked snapshot)."""
    root = os.path.join(cache, f"models--{repo.replace('/', '--')}")
    snapshot = os.path.join(root, "snapshots", "0" * 40)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in os.listdir(src):
        data = open(os.path.join(src, name), "rb").read()
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as fp:
            fp.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    return snapshot


def test_lora_expert_is_merged_with_its_adapter(zoo2, lora, tmp_path):
    out = str(tmp_path / "out")
    models = [{"model": f"{zoo2['expert0']}+{lora['adapter']}", "calibration": zoo2["expert0_data"]},
              {"model": zoo2["expert1"], "calibration": zoo2["expert1_data"]}]
    merge(com_config(models, ridge=1e-6), out, lora_merge_cache=str(tmp_path / "lora_cache"))
    # the expert the closed form sees is PEFT's own merge of the adapter
    assert_every_linear_is_closed_form(
        out, [lora["reference"], zoo2["expert1"]], [zoo2["expert0_data"], zoo2["expert1_data"]],
        alpha=lambda _n: 0.9, ridge=1e-6)


def test_a_lora_merge_cache_is_asked_for_and_kept_out_of_out_path(zoo2, lora, tmp_path):
    models = [{"model": f"{zoo2['expert0']}+{lora['adapter']}", "calibration": zoo2["expert0_data"]},
              {"model": zoo2["expert1"], "calibration": zoo2["expert1_data"]}]
    out = tmp_path / "out"
    with pytest.raises(ChainConfigError, match=r"has a LoRA adapter, which mergekit merges into a "
                                               r"folder first: pass --lora-merge-cache DIR"):
        merge(com_config(models), str(out))
    with pytest.raises(ChainConfigError, match=r"--lora-merge-cache .*cache is inside .*out, where the "
                                               r"merge into out_path .*out writes"):
        merge(com_config(models), str(out), lora_merge_cache=str(out / "cache"))
    assert not out.exists()  # nothing written, the cache included


def test_cached_snapshot_paths(zoo2, lora, tmp_path):
    cache = str(tmp_path / "hub")
    model = hf_cache_snapshot(zoo2["expert0"], cache, "pico/expert0")
    adapter = hf_cache_snapshot(lora["adapter"], cache, "pico/adapter")

    def run(name, first):
        models = [{"model": first, "calibration": zoo2["expert0_data"]},
                  {"model": zoo2["expert1"], "calibration": zoo2["expert1_data"]}]
        return merge(com_config(models), str(tmp_path / name),
                     lora_merge_cache=str(tmp_path / f"{name}_cache"))

    cached = run("cached", f"{model}+{adapter}")
    plain = run("plain", f"{zoo2['expert0']}+{lora['adapter']}")
    assert cached.keys() == plain.keys()
    assert all(torch.equal(cached[k], plain[k]) for k in plain)
