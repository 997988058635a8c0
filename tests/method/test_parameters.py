"""The parameter table is the single source of truth, and its checks name the value and the rule."""

import pytest

from mergekit_com.errors import ChainConfigError
from mergekit_com.method.parameters import (
    PARAMETERS,
    WALK_WIDE,
    Chain,
    Fallback,
    Objective,
    WalkSettings,
    check_value,
)


def test_choices_are_the_enums_and_every_default_passes_its_own_check():
    assert PARAMETERS["chain"].choices == tuple(c.value for c in Chain)
    assert PARAMETERS["objective"].choices == tuple(o.value for o in Objective)
    assert PARAMETERS["fallback"].choices == tuple(f.value for f in Fallback)
    for name, p in PARAMETERS.items():
        if p.default is not None:
            check_value(name, p.default, "(default)")
    assert {"chain", "objective", "num_samples", "max_seq_len", "batch_size"} <= set(WALK_WIDE)
    assert not any(PARAMETERS[n].per_model for n in WALK_WIDE)


@pytest.mark.parametrize("name,value,rule", [
    ("alpha", 1.5, "must be in [0, 1]"),
    ("alpha", float("nan"), "must be a finite number"),
    ("num_samples", 0, "must be a positive integer"),
    ("ridge", -1e-3, "must be >= 0"),
    ("ridge", 1e5, "must be at most 1: it is relative to each Gram's mean diagonal, so larger values "
                   "shrink every merged linear towards zero (the default is 1e-05)"),
    ("alpha", True, "must be a number in [0, 1] or auto"),
    ("blend", False, "must be a number in [0, 1] or auto"),
    ("weight", -1.0, "must be >= 0"),
    ("chain", "forward", "must be one of module, block, none"),
    ("activation_dtype", "int8", "must be one of auto, float32, bfloat16, float16"),
    ("activation_budget", 1e300, "must be at most 1e+06 (GB; 0 means half the free memory)"),
    ("lambda", 3e20, "must be between -1000 and 1000: it scales the summed task vectors of "
                     "fallback: task_arithmetic (values near 1 are usual)"),
])
def test_a_bad_value_names_itself_where_it_came_from_and_the_rule(name, value, rule):
    with pytest.raises(ChainConfigError) as e:
        check_value(name, value, "(at x.weight)")
    assert e.value.message == f"parameter '{name}' = {value!r} (at x.weight) {rule}"


def test_walk_settings_take_the_enums():
    values = {name: p.default for name, p in PARAMETERS.items()}
    settings = WalkSettings.from_values({**values, "chain": "none", "objective": "match_expert"})
    assert settings.chain is Chain.NONE and settings.objective is Objective.MATCH_EXPERT

