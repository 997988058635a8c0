"""`slices:`/`layer_range` and per-slice / per-tensor parameters, resolved as mergekit does."""

import json

import pytest
import torch

from mergekit_com.errors import ChainConfigError
from tests.support.every_linear import assert_every_linear_is_closed_form
from tests.support.merging import CLOSED_FORM, com_config, experts, merge


def sources(zoo, layer_range, **params):
    return [
        {"model": zoo[f"expert{i}"], "layer_range": list(layer_range),
         "parameters": {"calibration": zoo[f"expert{i}_data"], **params}}
        for i in range(2)
    ]


def sliced(zoo, *slices, **params):
    return {"merge_method": "chain_of_merges", "dtype": "float32", "parameters": {**CLOSED_FORM, **params},
            "slices": [dict(s) for s in slices]}


def check(zoo, out, **kwargs):
    return assert_every_linear_is_closed_form(
        out, [zoo["expert0"], zoo["expert1"]], [zoo["expert0_data"], zoo["expert1_data"]],
        ridge=1e-6, **kwargs)


def test_slices_covering_every_layer_equal_the_models_form(zoo2, tmp_path):
    whole = merge(com_config(experts(zoo2), ridge=1e-6), str(tmp_path / "models"))
    cfg = sliced(zoo2, {"sources": sources(zoo2, (0, 1))}, {"sources": sources(zoo2, (1, 2))},
                 ridge=1e-6)
    parts = merge(cfg, str(tmp_path / "slices"))
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)


def test_layer_range_walks_the_output_layer_order(zoo2, tmp_path):
    # output layer 0 is the experts' layer 1, fed by the (merged) embeddings directly
    out = str(tmp_path / "out")
    merged = merge(sliced(zoo2, {"sources": sources(zoo2, (1, 2))}, ridge=1e-6), out)
    assert not any(k.startswith("model.layers.1.") for k in merged)
    check(zoo2, out, alpha=lambda _n: 0.9,
          source_name=lambda n: n.replace("model.layers.0.", "model.layers.1."))


def test_per_slice_parameters(zoo2, tmp_path):
    out = str(tmp_path / "out")
    cfg = sliced(zoo2, {"sources": sources(zoo2, (0, 1)), "parameters": {"alpha": 0.5}},
                 {"sources": sources(zoo2, (1, 2)), "parameters": {"alpha": 0.7}}, ridge=1e-6)
    merge(cfg, out)
    # mergekit plans the head with the last slice's parameters
    check(zoo2, out, alpha=lambda n: 0.5 if n.startswith("model.layers.0.") else 0.7)


def test_per_tensor_filters_for_alpha_and_weight(zoo2, tmp_path):
    out = str(tmp_path / "out")
    models = experts(zoo2)
    models[1]["weight"] = [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]
    merge(com_config(models, ridge=1e-6,
                     alpha=[{"filter": "self_attn", "value": 0.5}, {"value": 0.95}]), out)
    check(zoo2, out,
          alpha=lambda n: 0.5 if "self_attn" in n else 0.95,
          weights=lambda n: [1.0, 3.0 if ".mlp." in n else 1.0])


def test_alpha_gradient_over_layers(zoo2, tmp_path):
    out = str(tmp_path / "out")
    merge(com_config(experts(zoo2), ridge=1e-6, alpha=[0.5, 0.9]), out)
    # t = layer / (layers - 1); the head is planned at t = 0
    check(zoo2, out, alpha=lambda n: 0.9 if n.startswith("model.layers.1.") else 0.5)


def test_slices_must_merge_the_same_models(zoo2, tmp_path):
    first = sources(zoo2, (0, 1))
    only_one = sources(zoo2, (1, 2))[:1]
    with pytest.raises(ChainConfigError, match="every slice must list the same models"):
        merge(sliced(zoo2, {"sources": first}, {"sources": only_one}), str(tmp_path / "out"))


def test_one_calibration_per_model(zoo2, tmp_path):
    second = sources(zoo2, (1, 2))
    second[0]["parameters"]["calibration"] = zoo2["expert1_data"]
    with pytest.raises(ChainConfigError, match="give one calibration per model"):
        merge(sliced(zoo2, {"sources": sources(zoo2, (0, 1))}, {"sources": second}),
              str(tmp_path / "out"))


def test_a_base_among_slice_sources_without_data_of_its_own_stays_the_base(zoo2, tmp_path):
    """mergekit needs the base_model in every slice; there, without a `calibration` of its
    own, it is the base (for fallback: task_arithmetic), as under models: when unlisted."""
    whole = merge(com_config(experts(zoo2), base=zoo2["base"], fallback="task_arithmetic"),
                  str(tmp_path / "models"))
    base_source = {"model": zoo2["base"], "layer_range": [0, 2]}
    cfg = dict(sliced(zoo2, {"sources": sources(zoo2, (0, 2)) + [base_source]},
                      fallback="task_arithmetic"), base_model=zoo2["base"])
    parts = merge(cfg, str(tmp_path / "slices"))
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    missing = dict(sliced(zoo2, {"sources": sources(zoo2, (0, 2))}), base_model=zoo2["base"])
    with pytest.raises(ChainConfigError, match=r"slices\[0\]: base_model .* is not among its sources"):
        merge(missing, str(tmp_path / "missing"))


def test_a_base_listed_under_models_without_data_of_its_own_stays_the_base(zoo2, tmp_path):
    """As among slice sources (mergekit makes models: into one slice): listed as in a ties
    config, with no `calibration` of its own (none, or only a top-level default), the
    base_model stays the base and no expert; with its own, it is an expert."""
    whole = merge(com_config(experts(zoo2), base=zoo2["base"], fallback="task_arithmetic"),
                  str(tmp_path / "unlisted"))
    listed = com_config(experts(zoo2) + [{"model": zoo2["base"]}], base=zoo2["base"],
                        fallback="task_arithmetic")
    assert_same(merge(listed, str(tmp_path / "listed")), whole)
    default = dict(listed, parameters={**listed["parameters"], "calibration": zoo2["expert0_data"]})
    default["models"] = [{"model": m["model"]} if m["model"] != zoo2["expert1"] else m
                         for m in listed["models"]]  # expert0 takes the default, as does the base
    assert_same(merge(default, str(tmp_path / "default")), whole)
    own = com_config(experts(zoo2) + [{"model": zoo2["base"], "calibration": zoo2["expert0_data"]}],
                     base=zoo2["base"], fallback="task_arithmetic")
    merged = merge(own, str(tmp_path / "own"))
    assert any(not torch.equal(merged[k], whole[k]) for k in whole)  # a third expert
    report = json.loads((tmp_path / "own" / "com_report.json").read_text())
    assert [e["model"] for e in report["experts"]][-1] == zoo2["base"]


def test_a_base_listed_under_another_spelling_is_named(zoo2, tmp_path):
    listed = com_config(experts(zoo2) + [{"model": zoo2["base"] + "/"}], base=zoo2["base"])
    with pytest.raises(ChainConfigError, match=r"model .*base/ and base_model .*base are one folder "
                                               r"written two ways; write it the same way"):
        merge(listed, str(tmp_path / "out"))


def assert_same(got, want):
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_layer_range_past_the_models_layers_stops_before_any_work(zoo2, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ChainConfigError, match=r"slices\[0\]\.sources\[0\]: layer_range \[0, 3\] of "
                                               r"model .* is not within its 2 layers"):
        merge(sliced(zoo2, {"sources": sources(zoo2, (0, 3))}), str(out))
    assert not out.exists()
