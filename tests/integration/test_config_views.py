"""Views of a mergekit config: every place a user can write models and parameters."""

from mergekit.config import MergeConfiguration

from mergekit_com.integration.config_views import (
    calibration_sources,
    listed_models,
    ordered_models,
    parameter_scopes,
)


def config(**kw):
    return MergeConfiguration.model_validate({"merge_method": "chain_of_merges", **kw})


def test_slices_give_every_scope_and_the_models_in_order():
    cfg = config(
        base_model="base",
        slices=[{"sources": [{"model": "b", "layer_range": [0, 2], "parameters": {"calibration": "b.jsonl"}},
                             {"model": "a", "layer_range": [0, 2],
                              "parameters": {"calibration": [{"filter": "mlp", "value": "a2.jsonl"},
                                                             {"value": "a.jsonl"}]}}],
                 "parameters": {"alpha": 0.8}}],
        parameters={"chain": "module"},
    )
    scopes = [(where, per_model) for where, _p, per_model in parameter_scopes(cfg)]
    assert scopes == [("parameters", False), ("slices[0]", False),
                      ("slices[0].sources[0] (b)", True), ("slices[0].sources[1] (a)", True)]
    assert [str(m) for m in listed_models(cfg)] == ["b", "a"]
    assert [str(m) for m in ordered_models(cfg)] == ["base", "b", "a"]
    assert calibration_sources(cfg) == ["a.jsonl", "a2.jsonl", "b.jsonl"]


def test_a_top_level_calibration_is_a_source_too():
    cfg = config(models=[{"model": "a"}, {"model": "b"}], parameters={"calibration": "all.jsonl"})
    assert calibration_sources(cfg) == ["all.jsonl"]
    assert [str(m) for m in listed_models(cfg)] == ["a", "b"]
