"""What `chain` changes, on experts that differ only in their linear weights
(identical embeddings and norms), so the layer-0 inputs agree everywhere."""

import os

import pytest
import torch
from safetensors.torch import load_file

from mergekit_com.method import layer
from tests.support.closed_form import assert_close, captured_inputs, regmean, texts_of
from tests.support.merging import com_config, experts, merge

L0 = "model.layers.0."
L1 = "model.layers.1."
QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
AFTER_QKV = ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def merged(zoo_linear_only, tmp_path_factory):
    root = tmp_path_factory.mktemp("chains")
    out = {
        chain: merge(com_config(experts(zoo_linear_only), chain=chain, ridge=1e-6),
                     str(root / chain))
        for chain in ("none", "block", "module")
    }
    out["dirs"] = {chain: str(root / chain) for chain in ("none", "block", "module")}
    return out


def same(a, b, name):
    return torch.allclose(a[f"{name}.weight"], b[f"{name}.weight"], rtol=1e-5, atol=1e-7)


def test_layer0_qkv_identical_across_chains(merged):
    for name in QKV:
        assert same(merged["none"], merged["module"], L0 + name)
        assert same(merged["block"], merged["module"], L0 + name)


def test_module_differs_from_regmean_after_the_first_merge(merged):
    # o_proj onwards sees merged q/k/v under CoM, the experts' own under RegMean
    for name in AFTER_QKV:
        assert not same(merged["none"], merged["module"], L0 + name)
    for name in QKV + AFTER_QKV:
        assert not same(merged["none"], merged["module"], L1 + name)
    assert not same(merged["none"], merged["module"], "lm_head")


def test_block_variant(merged, zoo_linear_only):
    # Inside layer 0 `block` runs each expert's own block on the (identical)
    # embeddings: exactly RegMean there.
    for name in AFTER_QKV:
        assert same(merged["block"], merged["none"], L0 + name)
        assert not same(merged["block"], merged["module"], L0 + name)
    # Layer 1 reads the block-merged layer 0's output: its q/k/v (behind a
    # norm every expert shares) are the closed form on the merged prefix.
    q = L1 + "self_attn.q_proj"
    xs = [captured_inputs(merged["dirs"]["block"], texts_of(zoo_linear_only[f"expert{i}_data"]), [q])[q]
          for i in range(2)]
    ws = [load_file(os.path.join(zoo_linear_only[f"expert{i}"], "model.safetensors"))[f"{q}.weight"]
          for i in range(2)]
    assert_close(merged["block"][f"{q}.weight"], regmean(xs, ws, alpha=0.9, ridge=1e-6))
    for name in QKV + AFTER_QKV:
        assert not same(merged["block"], merged["none"], L1 + name)
        assert not same(merged["block"], merged["module"], L1 + name)


def test_layer1_grams_are_those_of_the_merged_layer0_outputs(zoo_linear_only, tmp_path, monkeypatch):
    seen = {}
    original = layer.solve_group

    def spy(ctx, layer_key, group, stats, *args, **kwargs):
        seen[(layer_key, group[0])] = stats
        return original(ctx, layer_key, group, stats, *args, **kwargs)

    monkeypatch.setattr(layer, "solve_group", spy)
    out = str(tmp_path / "out")
    merge(com_config(experts(zoo_linear_only), chain="module", ridge=1e-6), out)
    stats = seen[("model.layers.1", "self_attn.q_proj")]
    assert len(stats.grams) == 2
    for model, gram in stats.grams.items():
        i = [zoo_linear_only["expert0"], zoo_linear_only["expert1"]].index(model.model.path)
        x = captured_inputs(out, texts_of(zoo_linear_only[f"expert{i}_data"]),
                            [L1 + "self_attn.q_proj"])[L1 + "self_attn.q_proj"].double()
        expected = x.T @ x / x.shape[0]
        torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-7)
