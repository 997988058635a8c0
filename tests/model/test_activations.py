"""The activation cache: tiers, dtypes, and merges that do not depend on where it lives."""

import os

import pytest
import torch

from mergekit_com.model.activations import (
    ActivationStore,
    CachedList,
    resolve_budget,
    resolve_dtype,
)
from tests.support.merging import com_config, experts, merge


def test_store_spills_to_disk_past_its_budget_and_cleans_up():
    t = [torch.randn(2, 3, 4) for _ in range(3)]
    one = t[0].numel() * 4
    store = ActivationStore(torch.device("cpu"), torch.float32, budget=2 * one)
    hs = CachedList(store, "merged", 0)
    for x in t:
        hs.append(x)
    assert store.spilled == {"host": 0, "disk": 1}
    spill_dir = store._dir
    assert len(os.listdir(spill_dir)) == 1
    assert all(torch.equal(hs[i], t[i]) for i in range(3))
    hs[2] = t[0] * 2  # overwriting a spilled entry replaces its file
    assert torch.equal(hs[2], t[0] * 2) and len(os.listdir(spill_dir)) == 1
    store.close()
    assert not os.path.exists(spill_dir)


def test_store_keeps_its_dtype_and_returns_float32():
    store = ActivationStore(torch.device("cpu"), torch.bfloat16, budget=1 << 20)
    x = torch.randn(4, 8)
    store.put(("own", 1, 0), x)
    assert store._data[("own", 1, 0)].dtype == torch.bfloat16
    back = store.get(("own", 1, 0))
    assert back.dtype == torch.float32 and torch.equal(back, x.to(torch.bfloat16).float())


def test_defaults():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_budget(1.5, torch.device("cpu")) == int(1.5 * 2**30)
    assert 0 < resolve_budget(0, torch.device("cpu"))


def test_merge_is_identical_when_the_cache_spills_to_disk(zoo2, tmp_path):
    """float32 on disk is lossless: a 1-byte budget changes nothing in the output."""
    for chain in ("module", "none"):
        ram = merge(com_config(experts(zoo2), chain=chain, objective="match_expert"), str(tmp_path / f"ram{chain}"))
        disk = merge(com_config(experts(zoo2), chain=chain, objective="match_expert",
                                activation_budget=1e-9), str(tmp_path / f"disk{chain}"))
        assert ram.keys() == disk.keys()
        assert all(torch.equal(ram[k], disk[k]) for k in ram), chain


def test_bfloat16_activations_stay_close(zoo2, tmp_path):
    ref = merge(com_config(experts(zoo2)), str(tmp_path / "f32"))
    low = merge(com_config(experts(zoo2), activation_dtype="bfloat16"), str(tmp_path / "bf16"))
    diffs = [(low[k] - ref[k]).norm() / ref[k].norm() for k in ref if ref[k].is_floating_point()]
    assert max(diffs) < 0.05 and max(diffs) > 0  # rounded, so not identical, but close


def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@needs_cuda
def test_cuda_store_spills_device_then_host_then_disk():
    x = torch.randn(64, 64, device="cuda")
    one = x.numel() * 2
    store = ActivationStore(torch.device("cuda"), torch.bfloat16, budget=one, host_budget=one)
    for b in range(3):
        store.put(("merged", 0, b), x + b)
    assert [store._tiers[("merged", 0, b)] for b in range(3)] == ["device", "host", "disk"]
    assert store._data[("merged", 0, 0)].device.type == "cuda"
    assert store._data[("merged", 0, 1)].device.type == "cpu"
    for b in range(3):
        back = store.get(("merged", 0, b))
        assert back.device.type == "cuda" and torch.equal(back, (x + b).to(torch.bfloat16).float())
    store.close()


@needs_cuda
def test_cuda_default_bfloat16_activations_stay_close(zoo2, tmp_path):
    ref = merge(com_config(experts(zoo2)), str(tmp_path / "cpu"))
    gpu = merge(com_config(experts(zoo2)), str(tmp_path / "gpu"), cuda=True)
    diffs = [(gpu[k] - ref[k]).norm() / ref[k].norm() for k in ref if ref[k].is_floating_point()]
    assert max(diffs) < 0.05
