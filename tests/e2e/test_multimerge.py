"""mergekit-multi: a CoM stage that consumes an earlier stage's output."""

import yaml

from tests.support.every_linear import assert_every_linear_is_closed_form
from tests.support.merging import CLOSED_FORM


def test_com_stage_after_a_linear_stage(zoo2, tmp_path):
    from mergekit.scripts.multimerge import main

    stage1 = {"name": "stage1", "merge_method": "linear", "dtype": "float32",
              "models": [{"model": zoo2["expert0"], "parameters": {"weight": 0.5}},
                         {"model": zoo2["expert1"], "parameters": {"weight": 0.5}}]}
    final = {"merge_method": "chain_of_merges", "dtype": "float32",
             "parameters": {**CLOSED_FORM, "ridge": 1e-6},
             "models": [{"model": "stage1", "parameters": {"calibration": zoo2["expert0_data"]}},
                        {"model": zoo2["expert1"], "parameters": {"calibration": zoo2["expert1_data"]}}]}
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump_all([stage1, final]))
    stages, out = tmp_path / "stages", tmp_path / "final"
    main.main([str(recipe), "--intermediate-dir", str(stages), "--out-path", str(out), "--quiet"],
              standalone_mode=False)
    assert (stages / "stage1" / "model.safetensors").exists()
    assert_every_linear_is_closed_form(
        str(out), [str(stages / "stage1"), zoo2["expert1"]],
        [zoo2["expert0_data"], zoo2["expert1_data"]], alpha=lambda _n: 0.9, ridge=1e-6)


def test_a_mistake_in_a_later_stage_stops_before_the_first_stage_runs(zoo2, tmp_path):
    import pytest
    from mergekit.scripts.multimerge import main

    from mergekit_com.errors import ChainConfigError

    stage1 = {"name": "stage1", "merge_method": "linear", "dtype": "float32",
              "models": [{"model": zoo2["expert0"], "parameters": {"weight": 0.5}},
                         {"model": zoo2["expert1"], "parameters": {"weight": 0.5}}]}
    final = {"merge_method": "chain_of_merges", "dtype": "float32", "parameters": {"alpah": 0.9},
             "models": [{"model": "stage1", "parameters": {"calibration": zoo2["expert0_data"]}},
                        {"model": zoo2["expert1"], "parameters": {"calibration": zoo2["expert1_data"]}}]}
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump_all([stage1, final]))
    stages, out = tmp_path / "stages", tmp_path / "final"
    with pytest.raises(ChainConfigError, match=r"^the final stage \(--out-path\): parameters: unknown "
                                               r"parameter 'alpah' .*did you mean 'alpha'"):
        main.main([str(recipe), "--intermediate-dir", str(stages), "--out-path", str(out), "--quiet"],
                  standalone_mode=False)
    assert not (stages / "stage1").exists() and not out.exists()
