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

    def add_residual(self, layer, linear, expert, gram, target, merged, target_norm=None):
        pass  # the protocol's signature (method/ports.py): a call it does not fit fails here

    def layer_state(self, layer):
        return {}

    def restore_layer(self, layer, state):
        pass


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The pinned llama experts as state dicts, their calibration batches, and the model."""
    return experts_and_batches(pinned.materialize(str(tmp_path_factory.mktemp("pinned"))), "llama")


def experts_and_batches(paths, family: str):
    """A pinned family's two experts as state dicts, their calibration batches, and the config."""
    experts, batches = {}, {}
    for i in range(2):
        folder = paths[f"{family}/expert{i}"]
        experts[f"e{i}"] = load_file(os.path.join(folder, "model.safetensors"))
        tok = AutoTokenizer.from_pretrained(folder)
        cal = load_calibration(paths[f"expert{i}_data"], tok, num_samples=12, max_seq_len=64)
        batches[f"e{i}"] = make_batches(cal.sequences, 4, pad_id=tok.pad_token_id, max_tokens=4 * 64)
    return AutoConfig.from_pretrained(paths[f"{family}/expert0"]), experts, batches


def walk(llama, chain, objective="regmean", tied=False, **kwargs) -> Dict[str, torch.Tensor]:
    config, experts, batches = llama
    names = list(experts["e0"])
    layers = tuple(tuple(n for n in names if n.startswith(f"model.layers.{i}."))
                   for i in range(config.num_hidden_layers))
    io = DictTensors(experts, alpha=0.9, ridge=1e-5)
    shell = ModelShell(config, layers[0][0], torch.device("cpu"))
    settings = WalkSettings.from_values(dict(chain=chain, objective=objective, batch_size=4,
                                             activation_dtype="float32", activation_budget=1.0))
    post = ("model.norm.weight",) + (() if tied else ("lm_head.weight",))
    ChainWalk(shell, Layout(("model.embed_tokens.weight",), layers, post),
              io, NoReport(), settings, batches, tied=tied, device=torch.device("cpu"),
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


def test_a_linear_the_forward_never_calls_follows_the_fallback_rule(llama, monkeypatch, caplog):
    """No inputs reach it, so there is nothing to fit: it is averaged (these ports' fallback)
    and named in a warning, not left out of the output."""
    from transformers.models.llama import modeling_llama

    def without_up(self, x):  # a forward that never calls up_proj
        return self.down_proj(self.act_fn(self.gate_proj(x)))

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", without_up)
    config, experts, _ = llama
    with caplog.at_level("WARNING", logger="mergekit.chain_of_merges.layer"):
        got = walk(llama, "module")
    for i in range(config.num_hidden_layers):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(got[name], (experts["e0"][name] + experts["e1"][name]) / 2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == config.num_hidden_layers
    assert lines[0] == ("model.layers.0: the forward never calls mlp.up_proj (on a probe of the "
                        "calibration's first tokens), so it has no inputs to fit; merged by the "
                        "fallback rule instead")


def test_a_linear_without_a_bias_beside_biased_ones_is_fitted_without_one(tmp_path, monkeypatch):
    """q/k/v share an input and Qwen2 gives each a bias. With k_proj's taken away, its merge
    is the one it has when none of the three has a bias: a bias is a column on a constant
    input, which a linear without one is not fitted with (layer 0's inputs are the same
    either way: the merged embeddings and norm)."""
    from torch import nn
    from transformers.models.qwen2 import modeling_qwen2

    config, experts, batches = experts_and_batches(pinned.materialize(str(tmp_path)), "qwen2")
    build = modeling_qwen2.Qwen2Attention.__init__

    def merged_without_biases(unbiased):
        def init(self, *args, **kwargs):
            build(self, *args, **kwargs)
            for name in unbiased:
                old = getattr(self, name)
                setattr(self, name, nn.Linear(old.in_features, old.out_features, bias=False))

        monkeypatch.setattr(modeling_qwen2.Qwen2Attention, "__init__", init)
        states = {e: {n: t for n, t in sd.items()
                      if not any(n.endswith(f".self_attn.{u}.bias") for u in unbiased)}
                  for e, sd in experts.items()}
        return walk((config, states, batches), "module", tied=True)

    k_alone = merged_without_biases(["k_proj"])
    none = merged_without_biases(["q_proj", "k_proj", "v_proj"])
    name = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(k_alone[name], none[name], rtol=1e-5, atol=1e-6)
    assert "model.layers.0.self_attn.k_proj.bias" not in k_alone


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
    one_ids, one_mask = sample_of((ids, mask), tokens=3)  # a longer first record is cut
    assert torch.equal(one_ids, ids[:1, :3]) and int(one_mask.sum()) == 3
    _, trimmed = sample_of((ids[2:], mask[2:]), tokens=100)
    assert trimmed.shape == (2, 4)  # padded only to its own longest row
