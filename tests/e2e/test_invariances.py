"""Merges that must give back what went in, whatever the data."""

import os

import torch
from safetensors.torch import load_file

from tests.support import pico
from tests.support.merging import com_config, experts, merge


def model_tensors(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_model(merged, reference, rtol=1e-4):
    assert merged.keys() == reference.keys()
    for name, ref in reference.items():
        atol = rtol * ref.abs().max().item()
        torch.testing.assert_close(merged[name], ref, rtol=rtol, atol=atol, msg=name)


def test_copies_of_one_model_merge_to_that_model(zoo2, tmp_path):
    # three copies of expert0, each calibrated on different data (one copy on the same data
    # twice would be refused: one expert counted twice)
    third = pico.write_jsonl(str(tmp_path / "third.jsonl"), pico.sample_texts(7))
    models = [{"model": zoo2["expert0"], "calibration": data}
              for data in (zoo2["expert0_data"], zoo2["expert1_data"], third)]
    # mergekit dedupes identical references; distinct paths make distinct inputs
    for i, m in enumerate(models[1:], start=1):
        copy = tmp_path / f"copy{i}"
        os.symlink(zoo2["expert0"], copy)
        m["model"] = str(copy)
    merged = merge(com_config(models, ridge=1e-9), str(tmp_path / "out"))
    assert_same_model(merged, model_tensors(zoo2["expert0"]))


def test_single_expert_merges_to_itself(zoo2, tmp_path):
    for chain in ("module", "none"):
        merged = merge(com_config(experts(zoo2, n=1), chain=chain, ridge=1e-9),
                       str(tmp_path / chain))
        assert_same_model(merged, model_tensors(zoo2["expert0"]))


def test_order_of_models_does_not_matter(zoo2, tmp_path):
    forward = merge(com_config(experts(zoo2)), str(tmp_path / "fwd"))
    backward = merge(com_config(list(reversed(experts(zoo2)))), str(tmp_path / "bwd"))
    assert_same_model(backward, forward, rtol=1e-5)


def test_weights_are_ratios_however_small(zoo2, tmp_path):
    """Equal weights of 1e-46 (below float32's smallest number) merge as 1s."""
    ones = merge(com_config(experts(zoo2)), str(tmp_path / "ones"))
    tiny = merge(com_config([dict(m, weight=1e-46) for m in experts(zoo2)]), str(tmp_path / "tiny"))
    assert_same_model(tiny, ones, rtol=1e-6)
