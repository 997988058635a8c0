"""com_report.json: relative residuals and covariate shifts, checked against direct computation."""

import hashlib
import json
import os
import platform

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import pico
from tests.support.closed_form import captured_inputs, texts_of
from tests.support.merging import com_config, experts, merge, read_tensors


def report_of(out):
    with open(os.path.join(out, "com_report.json"), encoding="utf-8") as fp:
        return json.load(fp)


@pytest.fixture(scope="module")
def merged(zoo2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "out")
    merge(com_config(experts(zoo2), ridge=1e-6), out)
    return out


def layer_inputs(model_dir, texts, index, max_seq_len=None):
    """Hidden states entering decoder layer ``index``, one unpadded sequence at a time."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    hook = model.model.layers[index].register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(kwargs.get("hidden_states", args[0] if args else None)[0]),
        with_kwargs=True)
    with torch.no_grad():
        for t in texts:
            model(input_ids=torch.tensor([tok(t)["input_ids"][:max_seq_len]]))
    hook.remove()
    return torch.cat(rows).double()


def test_layout_and_calibration_sources(zoo2, merged):
    report = report_of(merged)
    assert [e["model"] for e in report["experts"]] == [zoo2["expert0"], zoo2["expert1"]]
    assert [l["name"] for l in report["layers"]] == ["model.layers.0", "model.layers.1", "head"]
    assert set(report["layers"][0]["linears"]) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert report["settings"]["chain"] == "module" and report["settings"]["ridge"] == 1e-6
    # where it ran: the walk sets and reports its thread count (1 here, as the tests run)
    assert report["runtime"] == {"device": "cpu", "cpu_threads": torch.get_num_threads(), "ranks": 1,
                                 "malloc_tuned": platform.libc_ver()[0] == "glibc"}
    tok = AutoTokenizer.from_pretrained(zoo2["expert0"])
    for i, entry in enumerate(report["experts"]):
        path = zoo2[f"expert{i}_data"]
        cal = entry["calibration"]
        assert cal["file"] == os.path.basename(path)
        assert cal["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert cal["samples"] == len(texts_of(path))
        assert cal["tokens"] == sum(len(tok(t)["input_ids"]) for t in texts_of(path))


def test_residual_matches_its_definition(zoo2, merged):
    # chain: module -> the solve's inputs are those of the output model itself
    report = report_of(merged)
    out = read_tensors(merged)
    for i in range(2):
        expert = read_tensors(zoo2[f"expert{i}"])
        for layer, linear in [(0, "self_attn.q_proj"), (1, "mlp.down_proj")]:
            name = f"model.layers.{layer}.{linear}"
            x = captured_inputs(merged, texts_of(zoo2[f"expert{i}_data"]), [name])[name].double()
            target = x @ expert[f"{name}.weight"].double().T
            expected = ((x @ out[f"{name}.weight"].double().T - target).norm() / target.norm()).item()
            got = report["layers"][layer]["linears"][linear][i]
            assert got == pytest.approx(expected, rel=1e-4)
            assert 0 < got < 1


@pytest.mark.parametrize("exact", [False, True])
def test_covariate_shift_matches_its_definition(zoo2, tmp_path, exact):
    """On a sample of each expert's longest records by default (here its first batch: 3 of
    12 records, at 16 tokens each), on all of them with exact_shift."""
    out = str(tmp_path / "out")
    merge(com_config(experts(zoo2), ridge=1e-6, batch_size=3, max_seq_len=16,
                     exact_shift=exact), out)
    report = report_of(out)
    tok = AutoTokenizer.from_pretrained(zoo2["expert0"])
    for i in range(2):
        texts = texts_of(zoo2[f"expert{i}_data"])
        if not exact:  # batches take the longest records first: 3 x 16 tokens fill the first
            texts = sorted(texts, key=lambda t: min(len(tok(t)["input_ids"]), 16), reverse=True)[:3]
        h_merged = layer_inputs(out, texts, 1, max_seq_len=16)
        h_own = layer_inputs(zoo2[f"expert{i}"], texts, 1, max_seq_len=16)
        expected = ((h_merged - h_own).norm() / h_own.norm()).item()
        assert report["layers"][1]["covariate_shift"][i] == pytest.approx(expected, rel=1e-4)
        tokens = sum(min(len(tok(t)["input_ids"]), 16) for t in texts)
        assert report["experts"][i]["covariate_shift_tokens"] == tokens
    assert report["settings"]["exact_shift"] is exact


@pytest.mark.parametrize("chain", ["module", "none"])
def test_no_shift_at_layer0_when_experts_share_embeddings(zoo_linear_only, tmp_path, chain):
    out = str(tmp_path / "out")
    merge(com_config(experts(zoo_linear_only), chain=chain), out)
    layers = report_of(out)["layers"]
    assert layers[0]["covariate_shift"] == [0.0, 0.0]
    assert all(s > 1e-3 for s in layers[1]["covariate_shift"])  # the merged layer 0 drifts


def test_identical_experts_have_nothing_to_report(zoo2, tmp_path):
    third = pico.write_jsonl(str(tmp_path / "third.jsonl"), pico.sample_texts(7))  # data of its own
    models = [{"model": zoo2["expert0"], "calibration": data}
              for data in (zoo2["expert0_data"], zoo2["expert1_data"], third)]
    for i, m in enumerate(models[1:], start=1):  # distinct paths make distinct inputs
        os.symlink(zoo2["expert0"], tmp_path / f"copy{i}")
        m["model"] = str(tmp_path / f"copy{i}")
    out = str(tmp_path / "out")
    merge(com_config(models, ridge=1e-9), out)
    for layer in report_of(out)["layers"]:
        assert max(layer["covariate_shift"]) < 1e-5, layer["name"]
        assert max(layer["relative_residual"]) < 1e-5, layer["name"]


def test_the_report_and_card_give_max_seq_len_as_used(zoo2, tmp_path):
    """A max_seq_len beyond the model's positions is cut to them (with a warning): the
    report's and the card's settings say what was used."""
    out = str(tmp_path / "out")
    merge(com_config(experts(zoo2), max_seq_len=100000), out)
    positions = json.load(open(os.path.join(zoo2["expert0"], "config.json")))["max_position_embeddings"]
    assert report_of(out)["settings"]["max_seq_len"] == positions < 100000
    assert f"| `max_seq_len` | `{positions}` |" in open(os.path.join(out, "README.md")).read()
