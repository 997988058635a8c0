"""Stepping a transformers model one decoder layer at a time reproduces its own forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergekit_com.model.stepping import (
    ModelShell,
    find_layer_list,
    is_transposed,
    run_layer,
)
from tests.support import pico, pico_archs


def shell_and_model(arch: str):
    config = pico_archs.arch_config(arch, layers=3)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    first = next(n for n, _ in model.named_parameters() if ".0." in n)
    shell = ModelShell(config, first, torch.device("cpu"))
    layers_name = shell.layers_name
    for name, value in model.state_dict().items():
        if not name.startswith(layers_name + "."):
            shell.set_tensor(name, value)
    if config.tie_word_embeddings:
        shell.tie_embeddings()
    return shell, model


def layer_params(model, prefix):
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "phi3"])
def test_layer_by_layer_gives_the_models_own_hidden_states_and_head_input(arch):
    shell, model = shell_and_model(arch)
    ids = torch.randint(4, pico.VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hidden, calls = shell.embed(ids, mask)
    assert len(calls) == shell.num_layers == 3
    torch.testing.assert_close(hidden, want.hidden_states[0])
    for i in range(shell.num_layers):
        module = shell.instantiate(i, layer_params(model, shell.layer_prefix(i)))
        hidden = run_layer(module, hidden, calls[i])
        if i < shell.num_layers - 1:  # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(hidden, want.hidden_states[i + 1])
    x = shell.head_inputs(hidden, ids, mask, shell.model.get_output_embeddings())
    torch.testing.assert_close(x, want.hidden_states[-1])  # what lm_head receives


def test_instances_share_the_given_tensors_and_have_real_buffers():
    shell, model = shell_and_model("llama")
    params = layer_params(model, "model.layers.1.")
    module = shell.instantiate(1, params)
    for name, p in module.named_parameters():
        assert p.data_ptr() == params[name].data_ptr(), name  # no copy
    assert all(not b.is_meta for b in module.buffers())
    with pytest.raises(KeyError, match="no value for parameter"):
        shell.instantiate(1, {k: v for k, v in params.items() if "down_proj" not in k})


def test_layers_are_found_from_a_weight_name_and_conv1d_is_transposed():
    shell, model = shell_and_model("gpt2")
    name, layers = find_layer_list(model, "transformer.h.0.attn.c_attn.weight")
    assert name == "transformer.h" and len(layers) == 3
    assert all(is_transposed(model.get_submodule(f"transformer.h.0.{n}"))
               for n in shell.linear_names(0))
    with pytest.raises(ValueError, match="could not find the decoder layers"):
        find_layer_list(model, "nowhere.0.weight")
