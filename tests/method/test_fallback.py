"""The fallback rule for non-linear tensors."""

import pytest
import torch

from mergekit_com.method.fallback import fallback_merge
from mergekit_com.method.parameters import Fallback

A, B, BASE = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([1.0, 1.0])


def test_average_is_weighted_by_the_expert_weights():
    got = fallback_merge({"a": A, "b": B}, {"a": 1.0, "b": 3.0}, rule=Fallback.AVERAGE)
    torch.testing.assert_close(got, (A + 3 * B) / 4)


def test_task_arithmetic_scales_the_summed_task_vectors_around_the_base():
    got = fallback_merge({"a": A, "b": B}, {"a": 1.0, "b": 1.0}, rule=Fallback.TASK_ARITHMETIC,
                         base=BASE, scale=0.5)
    torch.testing.assert_close(got, BASE + 0.5 * ((A - BASE) + (B - BASE)))


def test_no_expert_gives_none_and_zero_weights_are_an_error():
    assert fallback_merge({}, {}, rule=Fallback.AVERAGE) is None
    with pytest.raises(ValueError, match="norm.weight: the expert weights sum to 0"):
        fallback_merge({"a": A}, {"a": 0.0}, rule=Fallback.AVERAGE, name="norm.weight")
    with pytest.raises(ValueError, match="needs the base model's tensor"):
        fallback_merge({"a": A}, {"a": 1.0}, rule=Fallback.TASK_ARITHMETIC)


def test_float64_stays_float64_and_lower_precision_is_computed_in_float32():
    assert fallback_merge({"a": A.double()}, {"a": 1.0}, rule=Fallback.AVERAGE).dtype == torch.float64
    assert fallback_merge({"a": A.bfloat16()}, {"a": 1.0}, rule=Fallback.AVERAGE).dtype == torch.float32


def test_an_average_takes_tiny_weights_as_ratios():
    """Weights are relative: 1e-46 each (below float32's smallest number) averages as 1 each."""
    got = fallback_merge({"a": A, "b": B}, {"a": 1e-46, "b": 3e-46}, rule=Fallback.AVERAGE)
    torch.testing.assert_close(got, fallback_merge({"a": A, "b": B}, {"a": 1.0, "b": 3.0},
                                                   rule=Fallback.AVERAGE))
