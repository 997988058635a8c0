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


def test_mergekit_pytorch_prints_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mergekit.scripts.merge_raw_pytorch import main

    monkeypatch.chdir(tmp_path)
    for name in ("a.pt", "b.pt"):
        torch.save({"w": torch.randn(3, 2)}, name)
    with open("cfg.yml", "w") as fp:
        fp.write(f"merge_method: {METHOD_NAME}\nmodels:\n  - model: a.pt\n  - model: b.pt\n")
    result = CliRunner().invoke(main, ["cfg.yml", "out"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(
        f"Error: {METHOD_NAME} merges whole models")
