"""The walk on plain-dict ports, without mergekit: it reproduces what the mergekit
path wrote for the pinned merges, and paused passes equal restarted ones."""

import os
from typing import Dict, Hashable

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from mergekit_com.io.calibration import load_calibration, make_batches
from mergekit_com.method.fallback import fallback_merge
from mergekit_com.method.parameters import Fallback, SolveSettings, WalkSettings
from mergekit_com.method.walk import ChainWalk, Layout
from mergekit_com.model.stepping import ModelShell
from tests.support import pinned


class DictTensors:
    """``TensorIO`` over state dicts: what a test (or another tool) plugs in instead of mergekit."""

    def __init__(self, experts: Dict[Hashable, Dict[str, torch.Tensor]], alpha: float,
                 ridge: float):
        self.experts, self.alpha, self.ridge = experts, alpha, ridge
        self.written: Dict[str, torch.Tensor] = {}
        self.order = []

    def read(self, names):
        return {n: {e: sd[n] for e, sd in self.experts.items() if n in sd} for n in names}

    def write_fallback(self, name, tensors):
        value = fallback_merge(tensors, {e: 1.0 for e in tensors}, rule=Fallback.AVERAGE)
        return self._keep(name, value)

    def write_solved(self, name, value, tensors):
        return self._keep(name, value)

    def rewrite(self, name, written):
        self._keep(name, written)

    def _keep(self, name, value):
        self.written[name] = value.to(torch.float32)
        self.order.append(name)
        return self.written[name]

    def solve_settings(self, name):
        return SolveSettings(alpha=self.alpha, ridge=self.ridge, weights=(1.0,) * len(self.experts))

    def end_layer(self):
        pass


class NoReport:
    def add_shift(self, *a):
        pass

    def add_alpha(self, *a):
        pass

    def add_blend(self, *a):
        pass

    def sum_shift_over_ranks(self, *a):
        pass

    def add_residual(self, *a):
        pass

    def layer_state(self, layer):
        return {}

    def restore_layer(self, layer, state):
        pass


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The pinned llama experts as state dicts, their calibration batches, and the model."""
    paths = pinned.materialize(str(tmp_path_factory.mktemp("pinned")))
    experts, batches = {}, {}
    for i in range(2):
        folder = paths[f"llama/expert{i}"]
        experts[f"e{i}"] = load_file(os.path.join(folder, "model.safetensors"))
        tok = AutoTokenizer.from_pretrained(folder)
        cal = load_calibration(paths[f"expert{i}_data"], tok, num_samples=12, max_seq_len=64)
        batches[f"e{i}"] = make_batches(cal.sequences, 4, pad_id=tok.pad_token_id, max_tokens=4 * 64)
    return AutoConfig.from_pretrained(paths["llama/expert0"]), experts, batches


def walk(llama, chain, objective="regmean", **kwargs) -> Dict[str, torch.Tensor]:
    config, experts, batches = llama
    names = list(experts["e0"])
    layers = tuple(tuple(n for n in names if n.startswith(f"model.layers.{i}."))
                   for i in range(config.num_hidden_layers))
    io = DictTensors(experts, alpha=0.9, ridge=1e-5)
    shell = ModelShell(config, layers[0][0], torch.device("cpu"))
    settings = WalkSettings.from_values(dict(chain=chain, objective=objective, batch_size=4,
                                             activation_dtype="float32", activation_budget=1.0))
    ChainWalk(shell, Layout(("model.embed_tokens.weight",), layers,
                            ("model.norm.weight", "lm_head.weight")),
              io, NoReport(), settings, batches, tied=False, device=torch.device("cpu"),
              **kwargs).run()
    return io.written


@pytest.mark.parametrize("chain,objective,case", [
    ("module", "regmean", "llama_module"), ("none", "regmean", "llama_none"),
    ("block", "match_expert", "llama_block_match_expert"),
])
def test_the_walk_on_dict_ports_writes_what_the_mergekit_path_wrote(llama, chain, objective, case,
                                                                   tmp_path):
    got = walk(llama, chain, objective)
    # the mergekit path on this CPU (the record is another CPU's float32 rounding)
    want = pinned.run_case(case, pinned.materialize(str(tmp_path / "in")), str(tmp_path / "out"))
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("chain,objective", [("module", "regmean"), ("module", "match_expert"),
                                             ("none", "regmean")])
def test_paused_passes_equal_restarted_ones(llama, chain, objective):
    paused = walk(llama, chain, objective)
    restarted = walk(llama, chain, objective, pass_budget=0)
    for name, value in paused.items():
        assert torch.equal(restarted[name], value), name


@pytest.mark.parametrize("chain", ["module", "block", "none"])
def test_targets_from_the_own_outputs_merge_as_the_cross_moments_do(llama, chain, monkeypatch):
    """o_proj and down_proj (no more outputs than inputs) keep X^T Y from the expert's own
    pass; the same walk keeping X^T Z for every group gives the same merge, to float32's
    sums (objective: blend, blend: auto: a well-conditioned fit; every chain's passes)."""
    from mergekit_com.method.layer import LayerMerge

    kept = []
    decide = LayerMerge._targets_by_outputs

    def spy(self, layer, group):
        chosen = decide(self, layer, group)
        if chosen:
            kept.append(group[0])
        return chosen

    monkeypatch.setattr(LayerMerge, "_targets_by_outputs", spy)
    by_outputs = walk(llama, chain, "blend")
    assert set(kept) == {"self_attn.o_proj", "mlp.down_proj"}
    monkeypatch.setattr(LayerMerge, "_targets_by_outputs", lambda *a: False)
    by_cross = walk(llama, chain, "blend")
    for name, value in by_cross.items():
        assert ((by_outputs[name] - value).norm() / value.norm()).item() < 1e-5, name


def test_tensors_are_written_in_forward_order(llama):
    config, experts, _ = llama
    io_order = list(walk(llama, "module"))
    assert io_order[0] == "model.embed_tokens.weight" and io_order[-1] == "lm_head.weight"
    layer_of = [int(n.split(".")[2]) for n in io_order if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)


@pytest.mark.parametrize("chain", ["module", "block", "none"])
def test_the_walk_leaves_the_grad_mode_as_it_found_it(llama, chain):
    import gc

    walk(llama, chain)
    gc.collect()
    assert torch.is_grad_enabled()


def test_the_shift_sample_is_the_first_rows_of_a_batch_up_to_its_token_bound():
    from mergekit_com.method.streams import sample_of

    ids = torch.arange(4 * 6).reshape(4, 6)
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    got_ids, got_mask = sample_of((ids, mask), tokens=11)
    assert torch.equal(got_ids, ids[:2]) and int(got_mask.sum()) == 11
    one_ids, _ = sample_of((ids, mask), tokens=3)  # never fewer than one record
    assert torch.equal(one_ids, ids[:1])
    _, trimmed = sample_of((ids[2:], mask[2:]), tokens=100)
    assert trimmed.shape == (2, 4)  # padded only to its own longest row
