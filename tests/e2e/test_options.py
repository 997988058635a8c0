"""mergekit's output options and flags with chain_of_merges (through MergeOptions,
which is what every mergekit-yaml flag sets; test_cli_flags.py parses them)."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from mergekit_com.errors import ChainConfigError
from tests.support.merging import com_config, experts, merge, read_tensors

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def reference(zoo2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "out")
    return merge(com_config(experts(zoo2)), out)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_and_out_dtype(zoo2, tmp_path):
    # one expert: the merge gives it back, read as bfloat16 and written as float16
    cfg = com_config(experts(zoo2, n=1), ridge=1e-9)
    cfg.update(dtype="bfloat16", out_dtype="float16")
    out = tmp_path / "out"
    merged = merge(cfg, str(out))
    expert = read_tensors(zoo2["expert0"])
    for name, value in merged.items():
        assert value.dtype == torch.float16, name
        expected = expert[name].to(torch.bfloat16).to(torch.float16)
        torch.testing.assert_close(value, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_dtype_alone_writes_every_tensor_in_it(zoo2, tmp_path):
    """Embeddings and norms (fallback rule) like the solved linears, as mergekit's methods do."""
    cfg = com_config(experts(zoo2))
    cfg.update(dtype="bfloat16")
    merged = merge(cfg, str(tmp_path / "out"))
    assert {str(v.dtype) for v in merged.values()} == {"torch.bfloat16"}


def test_out_shard_size(zoo2, tmp_path, reference):
    out = tmp_path / "out"
    merged = merge(com_config(experts(zoo2)), str(out), out_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged) and set(index["weight_map"].values()) == set(shards)
    assert same(merged, reference)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("copy", [True, False])
def test_copy_tokenizer(zoo2, tmp_path, copy):
    out = tmp_path / "out"
    merge(com_config(experts(zoo2)), str(out), copy_tokenizer=copy)
    files = set(os.listdir(out))
    assert (TOKENIZER_FILES <= files) == copy
    assert "generation_config.json" in files  # written either way (inputs have one)


@pytest.mark.parametrize("card", [True, False])
def test_write_model_card(zoo2, tmp_path, card):
    out = tmp_path / "out"
    merge(com_config(experts(zoo2)), str(out), write_model_card=card)
    files = set(os.listdir(out))
    assert ("README.md" in files) == card and ("mergekit_config.yml" in files) == card
    assert "com_report.json" in files  # the report is not part of the card


def test_lazy_unpickle_reads_bin_checkpoints(zoo2, tmp_path, reference):
    import shutil

    models = experts(zoo2)
    for i, m in enumerate(models):
        path = tmp_path / f"bin{i}"
        shutil.copytree(m["model"], path, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(read_tensors(m["model"]), path / "pytorch_model.bin")
        m["model"] = str(path)
    merged = merge(com_config(models), str(tmp_path / "out"), lazy_unpickle=True)
    assert same(merged, reference)


@pytest.mark.parametrize("option", [{"low_cpu_memory": True}, {"random_seed": 1},
                                    {"random_seed": 2}, {"device": "auto"}, {"device": "cpu"},
                                    {"read_to_gpu": True}, {"unsafe_truncate_embeddings": True}])
def test_options_that_leave_a_cpu_merge_unchanged(zoo2, tmp_path, reference, option):
    if option.get("device") == "auto" or option.get("read_to_gpu"):
        if torch.cuda.is_available():
            pytest.skip("resolves to a GPU here: covered by the gpu test")
    # CoM draws no random numbers: any seed gives the same bits
    assert same(merge(com_config(experts(zoo2)), str(tmp_path / "out"), **option), reference)


def test_unsafe_truncate_embeddings_does_not_hide_a_vocabulary_difference(zoo2, tmp_path):
    """Equal vocabularies merge with it (above); a model with one more embedding row is
    refused in one line that names tokenizer_source and says nothing is truncated."""
    from tests.support import pico

    config = pico.llama_config(layers=2, vocab_size=pico.VOCAB + 1)
    wider = pico.save_model(str(tmp_path / "wider"), config, pico.random_state(config, seed=0))
    models = experts(zoo2)
    models[1]["model"] = wider
    out = tmp_path / "out"
    with pytest.raises(ChainConfigError, match=r"different vocabularies; set `tokenizer_source: "
                                               r"union`.*does not truncate embeddings"):
        merge(com_config(models), str(out), unsafe_truncate_embeddings=True)
    assert not out.exists()


@pytest.mark.parametrize("option, message", [
    ({"multi_gpu": True}, r"--multi-gpu \(or --gpu-rich\) is not supported.*--cuda or --device"),
    ({"cuda": True}, r"--device cuda \(or --cuda\): torch sees no cuda device"),
    ({"device": "cuda:7"}, r"--device cuda:7 \(or --cuda\)"),
])
def test_unusable_devices_fail_before_any_work(zoo2, tmp_path, option, message):
    if torch.cuda.device_count() > 7 or ("cuda" in option and torch.cuda.is_available()):
        pytest.skip("this machine has the device")
    out = tmp_path / "out"
    with pytest.raises(ChainConfigError, match=message):
        merge(com_config(experts(zoo2)), str(out), **option)
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_cpu(zoo2, tmp_path, reference):
    # float32 activations: the GPU default (bfloat16) is checked in test_activations
    merged = merge(com_config(experts(zoo2), activation_dtype="float32"), str(tmp_path / "out"), cuda=True)
    for name, value in reference.items():
        atol = 1e-3 * value.abs().max().item()
        torch.testing.assert_close(merged[name], value, rtol=1e-3, atol=atol, msg=name)


REMOTE_CONFIG = '''from transformers import LlamaConfig


class PicoLlamaConfig(LlamaConfig):
    model_type = "picollama"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_pico import PicoLlamaConfig


class PicoLlamaForCausalLM(LlamaForCausalLM):
    config_class = PicoLlamaConfig
'''


def remote_code_copy(src: str, dst) -> str:
    """``src`` re-declared as a custom-code architecture (a Llama subclass)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="picollama", architectures=["PicoLlamaForCausalLM"], auto_map={
        "AutoConfig": "configuration_pico.PicoLlamaConfig",
        "AutoModelForCausalLM": "modeling_pico.PicoLlamaForCausalLM"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "configuration_pico.py").write_text(REMOTE_CONFIG)
    (dst / "modeling_pico.py").write_text(REMOTE_MODEL)
    return str(dst)


def test_trust_remote_code(zoo2, tmp_path, reference):
    import uuid

    from transformers import AutoModelForCausalLM

    models = experts(zoo2)
    for m in models:
        # transformers caches remote code by folder name in ~/.cache: keep it unique
        m["model"] = remote_code_copy(m["model"], tmp_path / f"pico_remote_{uuid.uuid4().hex[:8]}")
    with pytest.raises(ValueError, match="trust_remote_code"):
        merge(com_config(models), str(tmp_path / "refused"))
    out = tmp_path / "out"
    merged = merge(com_config(models), str(out), trust_remote_code=True)
    # the custom class is a Llama: the same walk (mergekit infers its tensor layout,
    # so tensors may come in another order: float rounding only)
    assert merged.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-5 * value.abs().max().item())
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "PicoLlamaForCausalLM"


def test_one_bar_per_phase_and_quiet_silences_them(zoo2, tmp_path, capfd):
    merge(com_config(experts(zoo2)), str(tmp_path / "loud"), quiet=False)
    loud = capfd.readouterr().err
    for bar in ("Checking weights", "Loading calibration", "Chain of Merges", "model.layers.1"):
        assert bar in loud
    bars = {line.split(":")[0].strip() for line in loud.replace("\r", "\n").splitlines()
            if "%|" in line}
    # mergekit's own bars, and one per phase of ours; no transformers loading bars
    assert bars == {"Warmup loader cache", "Executing graph", "Checking weights",
                    "Loading calibration", "Chain of Merges"}, bars
    assert "deprecated" not in loud
    merge(com_config(experts(zoo2)), str(tmp_path / "quiet"), quiet=True)
    quiet = capfd.readouterr().err
    assert "%|" not in quiet and "Chain of Merges" not in quiet


def test_logging_goes_through_mergekits_logger(zoo2, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="mergekit"):
        merge(com_config(experts(zoo2)), str(tmp_path / "out"))
    ours = [r for r in caplog.records if r.name.startswith("mergekit.chain_of_merges.")]
    assert any("tokens from" in r.getMessage() for r in ours)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit"):
        merge(com_config(experts(zoo2)), str(tmp_path / "out2"))
    assert not [r for r in caplog.records if r.levelno < logging.WARNING]


def test_safetensors_carry_metadata(zoo2, tmp_path):
    out = tmp_path / "out"
    merge(com_config(experts(zoo2)), str(out))
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
