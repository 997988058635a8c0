"""Paused layer passes: the same values as a plain forward, and resumed on the weights
installed while they were paused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergekit_com.model.passes import LayerPass, PausableLayer
from mergekit_com.model.stepping import (
    ModelShell,
    linear_call_groups,
    run_layer,
    set_parameter,
)
from tests.support import pico

GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.fixture(scope="module")
def layer0():
    """A Llama layer 0 as its own module, its input batch and call arguments."""
    config = pico.llama_config(layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    shell = ModelShell(config, "model.layers.0.self_attn.q_proj.weight", torch.device("cpu"))
    params = {k[len("model.layers.0."):]: v for k, v in model.state_dict().items()
              if k.startswith("model.layers.0.")}
    ids = torch.randint(4, pico.VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    for name, value in model.state_dict().items():
        if not name.startswith("model.layers."):
            shell.set_tensor(name, value)
    hidden, calls = shell.embed(ids, mask)
    return shell, params, hidden, calls[0]


def captured(module, hidden, call):
    got = {}
    handles = [module.get_submodule(g[0]).register_forward_pre_hook(
        lambda _m, args, key=g[0]: got.setdefault(key, args[0])) for g in GROUPS]
    out = run_layer(module, hidden, call)
    for h in handles:
        h.remove()
    return got, out


def test_groups_are_found_in_call_order(layer0):
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    names = shell.linear_names(0)
    assert linear_call_groups(module, hidden, call, names) == GROUPS


@pytest.mark.parametrize("keep", [True, False])
def test_a_pass_gives_each_group_input_and_the_output_of_a_plain_forward(layer0, keep):
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    want_inputs, want_out = captured(module, hidden, call)
    layer = PausableLayer(module, {g[0]: g[0] for g in GROUPS})
    run = LayerPass(layer, lambda: hidden, call, keep=keep)
    for g in GROUPS:
        assert torch.equal(run.input_of(g[0]), want_inputs[g[0]])
    assert torch.equal(run.output(), want_out)
    layer.close()


@pytest.mark.parametrize("keep", [True, False])
def test_weights_installed_while_paused_are_used_when_resumed(layer0, keep):
    """What the chain does: solve a group, install it, carry on from there."""
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, dict(params))
    layer = PausableLayer(module, {g[0]: g[0] for g in GROUPS})
    run = LayerPass(layer, lambda: hidden, call, keep=keep)
    run.input_of("self_attn.o_proj")
    new = {k: torch.randn_like(params[f"{k}.weight"]) for k in ("self_attn.o_proj", "mlp.down_proj")}
    for k, w in new.items():
        set_parameter(module, f"{k}.weight", w)
    got = run.output()
    layer.close()
    reference = shell.instantiate(0, {**params, **{f"{k}.weight": w for k, w in new.items()}})
    assert torch.equal(got, run_layer(reference, hidden, call))
    assert not torch.equal(got, run_layer(shell.instantiate(0, params), hidden, call))


@pytest.mark.parametrize("keep", [True, False])
def test_a_pass_hands_over_its_linears_outputs_and_carries_on(layer0, keep):
    """An expert's own pass runs on through a group and gives each linear's output on
    the group's input: what the targets ``Y = Z W^T`` are built from."""
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    want_inputs, want_out = captured(module, hidden, call)
    every = [k for g in GROUPS for k in g]
    layer = PausableLayer(module, {g[0]: g[0] for g in GROUPS}, outputs=every)
    run = LayerPass(layer, lambda: hidden, call, keep=keep)
    for g in GROUPS:
        x, outputs = run.input_and_outputs(g[0], g)
        assert torch.equal(x, want_inputs[g[0]])
        assert list(outputs) == g
        for k in g:
            assert torch.equal(outputs[k], module.get_submodule(k)(x))
    assert torch.equal(run.output(), want_out)
    # a pass that is not capturing records nothing: the same layer, plain stops
    plain = LayerPass(layer, lambda: hidden, call, keep=keep)
    assert torch.equal(plain.input_of("mlp.down_proj"), want_inputs["mlp.down_proj"])
    assert torch.equal(plain.output(), want_out)
    layer.close()


def test_outputs_of_a_linear_the_pass_never_calls_are_an_error(layer0):
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    layer = PausableLayer(module, {"self_attn.q_proj": "self_attn.q_proj"}, outputs=["mlp.up_proj"])
    run = LayerPass(layer, lambda: hidden, call)
    with pytest.raises(RuntimeError, match="never called self_attn.k_proj after self_attn.q_proj"):
        run.input_and_outputs("self_attn.q_proj", ["self_attn.k_proj"])
    layer.close()


def test_a_stop_the_forward_never_reaches_is_an_error(layer0):
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    layer = PausableLayer(module, {"mlp.down_proj": "mlp.down_proj"})
    with pytest.raises(RuntimeError, match="never reached self_attn.q_proj"):
        LayerPass(layer, lambda: hidden, call).input_of("self_attn.q_proj")
    layer.close()


def test_many_passes_paused_at_once_do_not_disturb_each_other(layer0):
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    layer = PausableLayer(module, {g[0]: g[0] for g in GROUPS})
    inputs = [hidden * s for s in (1.0, 0.5, 2.0)]
    runs = [LayerPass(layer, lambda h=h: h, call) for h in inputs]
    for g in GROUPS:  # the walk's order: every batch to group g, then the next group
        for run in runs:
            run.input_of(g[0])
    outs = [run.output() for run in runs]
    layer.close()
    for h, out in zip(inputs, outs):
        assert torch.equal(out, run_layer(module, h, call))


def test_a_pass_left_paused_is_collected_and_never_changes_the_grad_mode(layer0):
    import gc
    import weakref

    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    layer = PausableLayer(module, {g[0]: g[0] for g in GROUPS})
    assert torch.is_grad_enabled()
    closed, dropped = LayerPass(layer, lambda: hidden, call), LayerPass(layer, lambda: hidden, call)
    with torch.no_grad():  # as the walk runs them
        closed.input_of("self_attn.o_proj")
        dropped.input_of("self_attn.o_proj")
    assert torch.is_grad_enabled()
    closed.close()
    paused = weakref.ref(dropped._run)
    del dropped
    gc.collect()
    assert paused() is None  # its intermediate activations are freed
    assert torch.is_grad_enabled()
    layer.close()


def _zeroed_after_handover(layer0):
    """A pass whose forward goes on to zero ``mlp.down_proj``'s output in place (an in-place
    residual add or activation would change it too), after the pass's own hook has run."""
    shell, params, hidden, call = layer0
    module = shell.instantiate(0, params)
    down = module.get_submodule("mlp.down_proj")
    layer = PausableLayer(module, {g[0]: g[0] for g in GROUPS}, outputs=["mlp.down_proj"])
    handle = down.register_forward_hook(lambda _m, _a, out: out.mul_(0.0))
    return down, layer, handle, LayerPass(layer, lambda: hidden, call)


def test_handed_over_outputs_are_what_the_linear_returned_even_if_changed_in_place(layer0):
    """A forward that goes on to modify a linear's output in place must not change the
    target handed over."""
    down, layer, handle, run = _zeroed_after_handover(layer0)
    x, outputs = run.input_and_outputs("mlp.down_proj", ["mlp.down_proj"])
    run.output()
    handle.remove()
    layer.close()
    assert torch.equal(outputs["mlp.down_proj"], torch.nn.functional.linear(x, down.weight))


def test_handed_over_outputs_can_be_taken_as_they_are_made(layer0):
    """``keep`` decides what is handed over of each output (here the first rows, as the
    statistics gather their tokens' rows), called as the linear returns: an in-place change
    after that does not reach it either."""
    down, layer, handle, run = _zeroed_after_handover(layer0)
    kept = []

    def first_rows(y):
        kept.append(y.shape)
        return y.reshape(-1, y.shape[-1])[:3].clone()

    x, outputs = run.input_and_outputs("mlp.down_proj", ["mlp.down_proj"], keep=first_rows)
    run.output()
    handle.remove()
    layer.close()
    assert len(kept) == 1
    want = torch.nn.functional.linear(x, down.weight).reshape(-1, down.weight.shape[0])[:3]
    assert torch.equal(outputs["mlp.down_proj"], want)
