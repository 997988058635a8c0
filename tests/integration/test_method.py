"""chain_of_merges in mergekit's registry: whole merges only, per-tensor calls refused."""

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods import merge_state_dicts

from mergekit_com.integration.method import PerTensorMergeError
from mergekit_com.method.parameters import METHOD_NAME


def test_per_tensor_calls_are_refused_without_touching_the_inputs():
    tensors = [torch.randn(4, 6).T for _ in range(2)]
    copies = [t.clone() for t in tensors]
    with pytest.raises(PerTensorMergeError, match="merges whole models .* not single tensors"):
        merge_state_dicts([{"w": t} for t in tensors], METHOD_NAME, parameters={"weight": 1.0})
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


def test_only_chain_of_merges_declares_a_model_walk():
    walkers = [m.spec.name for m in merge_methods.registered_methods()
               if getattr(m, "needs_model_walk", False)]
    assert walkers == [METHOD_NAME]
