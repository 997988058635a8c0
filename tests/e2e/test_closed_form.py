"""The merged weights are exactly the closed forms of the method."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.support import pico
from tests.support.closed_form import (
    assert_close,
    blend_solution,
    packed_folds,
    captured_inputs,
    captured_sequences,
    held_out_share,
    ledoit_wolf_alpha,
    match_expert,
    regmean,
    texts_of,
)
from tests.support.merging import com_config, experts, merge

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def module_of(name: str) -> str:
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def linear_modules(layers: int):
    out = [f"model.layers.{i}.{module_of(n)}.{n}" for i in range(layers) for n in LINEARS]
    return out + ["lm_head"]


def expert_tensors(zoo, n=2):
    return [load_file(os.path.join(zoo[f"expert{i}"], "model.safetensors")) for i in range(n)]


@pytest.fixture(scope="module")
def zoo1(tmp_path_factory):
    return pico.build_experts(str(tmp_path_factory.mktemp("zoo1")), n_experts=2, layers=1)


def test_one_layer_q_proj_matches_closed_form(zoo1, tmp_path):
    merged = merge(com_config(experts(zoo1), alpha=0.8, ridge=1e-6), str(tmp_path / "out"))
    q = "model.layers.0.self_attn.q_proj"
    xs = [captured_inputs(str(tmp_path / "out"), texts_of(zoo1[f"expert{i}_data"]), [q])[q]
          for i in range(2)]
    ws = [t[f"{q}.weight"] for t in expert_tensors(zoo1)]
    assert_close(merged[f"{q}.weight"], regmean(xs, ws, alpha=0.8, ridge=1e-6))
    # and it is a real merge, not one of the experts
    assert not torch.allclose(merged[f"{q}.weight"], ws[0])


def test_every_linear_is_optimal_given_the_merged_prefix(zoo2, tmp_path):
    """Under chain: module each linear's inputs are those of the final merged
    model itself, so hooks on the output model reproduce every solve."""
    out = str(tmp_path / "out")
    weights = [1.0, 2.5]
    cfg = com_config(experts(zoo2), alpha=0.9, ridge=1e-6, batch_size=5)
    for m, w in zip(cfg["models"], weights):
        m["parameters"]["weight"] = w
    merged = merge(cfg, out)
    modules = linear_modules(2)
    caps = [captured_inputs(out, texts_of(zoo2[f"expert{i}_data"]), modules) for i in range(2)]
    tensors = expert_tensors(zoo2)
    for m in modules:
        expected = regmean([c[m] for c in caps], [t[f"{m}.weight"] for t in tensors],
                           alpha=0.9, ridge=1e-6, weights=weights)
        assert_close(merged[f"{m}.weight"], expected)


def test_match_expert_objective_closed_form(zoo2, tmp_path):
    out = str(tmp_path / "out")
    # alpha: auto (the default) is ignored by match_expert: neither estimated nor reported
    merged = merge(com_config(experts(zoo2), objective="match_expert", alpha="auto", ridge=1e-6), out)
    report = json.loads(open(os.path.join(out, "com_report.json")).read())
    assert not any("alpha" in layer for layer in report["layers"])
    modules = linear_modules(2)
    xs = [captured_inputs(out, texts_of(zoo2[f"expert{i}_data"]), modules) for i in range(2)]
    zs = [captured_inputs(zoo2[f"expert{i}"], texts_of(zoo2[f"expert{i}_data"]), modules)
          for i in range(2)]
    tensors = expert_tensors(zoo2)
    for m in modules:
        x, z = [x[m] for x in xs], [z[m] for z in zs]
        w = [t[f"{m}.weight"] for t in tensors]
        expected = match_expert(x, z, w, ridge=1e-6)
        if m.endswith("o_proj"):
            # Attention outputs of these random pico models are nearly rank
            # deficient (cond ~1e6, no shrinkage here), so float32 noise in
            # the activations moves the weights but not the fit: compare the
            # objective the solve minimises instead. How much float32 noise costs the fit
            # depends on the CPU's GEMM kernels: 1.2e-5 of the loss on an AVX-512 CPU, under
            # 1e-5 on the CPU this test was written on.
            def loss(v):
                return sum(((xi.double() @ v.double().T - zi.double() @ wi.double().T) ** 2).mean()
                           for xi, zi, wi in zip(x, z, w))
            assert abs(loss(merged[f"{m}.weight"]) - loss(expected)) <= 1e-4 * loss(expected)
        else:
            assert_close(merged[f"{m}.weight"], expected)


def test_bias_is_solved_jointly_with_its_weight(tmp_path):
    # Qwen2: q/k/v carry a bias (and mergekit's architecture lists it)
    zoo = pico.build_experts(str(tmp_path / "zoo"), n_experts=2, layers=1, arch="qwen2")
    out = str(tmp_path / "out")
    merged = merge(com_config(experts(zoo), alpha=0.9, ridge=1e-6), out)
    tensors = expert_tensors(zoo)
    for name in ("q_proj", "v_proj"):
        m = f"model.layers.0.self_attn.{name}"
        xs = [captured_inputs(out, texts_of(zoo[f"expert{i}_data"]), [m])[m] for i in range(2)]
        xs = [torch.cat([x, torch.ones(x.shape[0], 1)], dim=1) for x in xs]  # constant input
        ws = [torch.cat([t[f"{m}.weight"], t[f"{m}.bias"][:, None]], dim=1) for t in tensors]
        expected = regmean(xs, ws, alpha=0.9, ridge=1e-6)
        assert_close(merged[f"{m}.weight"], expected[:, :-1])
        assert_close(merged[f"{m}.bias"], expected[:, -1])
        assert not torch.allclose(merged[f"{m}.bias"], (tensors[0][f"{m}.bias"] + tensors[1][f"{m}.bias"]) / 2)


def test_non_linear_tensors_use_the_fallback(zoo2, tmp_path):
    merged = merge(com_config(experts(zoo2)), str(tmp_path / "avg"))
    tensors = expert_tensors(zoo2)
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.1.input_layernorm.weight"):
        torch.testing.assert_close(merged[name], (tensors[0][name] + tensors[1][name]) / 2)

    ta = merge(com_config(experts(zoo2), base=zoo2["base"], fallback="task_arithmetic",
                          **{"lambda": 0.5}), str(tmp_path / "ta"))
    base = load_file(os.path.join(zoo2["base"], "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        expected = base[name] + 0.5 * ((tensors[0][name] - base[name]) + (tensors[1][name] - base[name]))
        torch.testing.assert_close(ta[name], expected)
    # the base is not an expert: the linears ignore it
    torch.testing.assert_close(ta["model.layers.0.self_attn.q_proj.weight"],
                               merged["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("batch_size", [5, 2])
def test_the_defaults_are_the_auto_alpha_and_auto_blend_closed_form(zoo1, tmp_path, batch_size):
    """With every default, alpha: auto is the Ledoit-Wolf keep ratio of each expert's own
    sequences and blend: auto the share that best predicts the experts' outputs on held-out
    sequences (whole sequences, alternating within each length-sorted packed batch); both
    are reported in com_report.json and give the closed-form merge."""
    import json

    out = str(tmp_path / "out")
    merged = merge(com_config(experts(zoo1), defaults=True, ridge=1e-6, batch_size=batch_size,
                              max_seq_len=16), out)
    report = json.loads(open(os.path.join(out, "com_report.json")).read())
    assert {k: report["settings"][k] for k in ("objective", "blend", "alpha")} == {
        "objective": "blend", "blend": "auto", "alpha": "auto"}
    layer = report["layers"][0]
    tensors = expert_tensors(zoo1)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        m = f"model.layers.0.{name}"
        x_seqs = [captured_sequences(out, texts_of(zoo1[f"expert{i}_data"]), [m], 16)[m]
                  for i in range(2)]
        z_seqs = [captured_sequences(zoo1[f"expert{i}"], texts_of(zoo1[f"expert{i}_data"]), [m], 16)[m]
                  for i in range(2)]
        alphas = [ledoit_wolf_alpha(s) for s in x_seqs]
        assert layer["alpha"][name] == pytest.approx(alphas, abs=1e-5)
        assert all(0.0 < a < 1.0 for a in alphas)  # 12 short sequences per expert: real shrinkage
        ws = [t[f"{m}.weight"] for t in tensors]
        folds = [packed_folds([len(x) for x in s], batch_size, 16) for s in x_seqs]
        assert all(0 < sum(f) < len(f) for f in folds)  # both folds hold sequences
        share = held_out_share(x_seqs, z_seqs, ws, alphas, ridge=1e-6, folds=folds)
        assert layer["blend"][name] == pytest.approx(share, abs=2e-3)
        expected = blend_solution([torch.cat(s) for s in x_seqs], [torch.cat(s) for s in z_seqs], ws,
                                  alphas, layer["blend"][name], ridge=1e-6)
        assert_close(merged[f"{m}.weight"], expected, rtol=1e-4)
