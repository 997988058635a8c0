"""Which models CoM can walk, decided at planning from the transformers model itself.

CoM steps a decoder-only causal LM one decoder layer at a time and solves
its dense linears in closed form. Anything else is refused here, before
any tensor is loaded, with a message naming the architecture. The checks
read the configuration and a parameter-free (meta-device) instance of
the output model, never a per-architecture table.
"""

from __future__ import annotations

import copy
from typing import Iterable, List, Tuple

import torch
from torch import nn

from mergekit_com.errors import ChainConfigError, first_line, listed
from mergekit_com.method.parameters import METHOD_NAME

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def architecture_name(config) -> str:
    names = getattr(config, "architectures", None) or [type(config).__name__]
    return names[0]


def check_model_kind(config, arch_info) -> None:
    """Encoder-decoders, multimodal towers and multi-module models."""
    name = architecture_name(config)
    if getattr(config, "is_encoder_decoder", False):
        raise ChainConfigError(
            f"{METHOD_NAME} does not support {name}: it is an encoder-decoder model; "
            "CoM walks decoder-only causal LMs"
        )
    towers = [k for k in getattr(config, "sub_configs", {}) or {} if k != "text_config"]
    if towers:
        raise ChainConfigError(
            f"{METHOD_NAME} does not support {name}: it has a {', '.join(sorted(towers))} "
            "(a non-text tower); CoM merges text-only causal LMs, so merge the language "
            "model on its own"
        )
    if len(arch_info.modules) != 1:
        raise ChainConfigError(
            f"{METHOD_NAME} does not support {name}: mergekit describes it with modules "
            f"{', '.join(arch_info.modules)}; CoM supports single-module causal LMs"
        )


def meta_model(config, trust_remote_code: bool) -> nn.Module:
    """The output model with no storage: for inspection only."""
    from transformers import AutoModelForCausalLM

    name = architecture_name(config)
    try:
        with torch.device("meta"):
            # a copy: from_config writes the dtype into the configuration it is given
            model = AutoModelForCausalLM.from_config(
                copy.deepcopy(config), trust_remote_code=trust_remote_code, dtype=torch.float32
            )
    except ValueError as e:
        raise ChainConfigError(
            f"{METHOD_NAME} does not support {name}: transformers has no causal-LM class "
            f"for it ({first_line(e)})"
        ) from None
    built = type(model).__name__
    if built != name and not name.endswith(_CAUSAL_SUFFIXES):
        raise ChainConfigError(
            f"{METHOD_NAME} does not support {name}: it is not a causal LM "
            f"(for this configuration transformers' causal LM is {built})"
        )
    return model


def _experts_in(layer: nn.Module) -> List[str]:
    """Mixture-of-experts parts: stacked per-expert weights or `experts` submodules."""
    found = [n for n, p in layer.named_parameters() if p.dim() > 2]
    found += [n for n, _ in layer.named_modules() if n.split(".")[-1] == "experts"]
    return found


def check_layers(model: nn.Module, layers: nn.ModuleList, layers_name: str) -> None:
    """Decoder layers whose feed-forward is a mixture of experts."""
    name = type(model).__name__
    moe = _experts_in(layers[0])
    if moe:
        raise ChainConfigError(
            f"{METHOD_NAME} does not support {name}: it is a mixture-of-experts model "
            f"({layers_name}.0.{moe[0]}); CoM's closed form covers dense linear layers only"
        )


def check_coverage(
    model: nn.Module, layer_names: Iterable[Tuple[str, ...]], outside: Iterable[str],
    arch_label: str,
) -> None:
    """Every parameter the model uses must be one mergekit plans to load and write.

    A parameter missing from mergekit's architecture definition (e.g. the
    attention biases of a Llama with ``attention_bias: true``, which
    llama.json does not list) would be left uninitialised in the walk.
    """
    planned = set(outside)
    for names in layer_names:
        planned.update(names)
    missing = [
        n for n, _ in model.named_parameters()  # tied parameters are listed once
        if n not in planned
    ]
    if missing:
        shown = listed(missing, 4)
        # names the definition has that the model does not: transformers may have renamed
        # the checkpoint's tensors as it built the model (GPT-NeoX's embed_out -> lm_head)
        names = {n for n, _ in model.named_parameters()}
        kinds = {n.rsplit(".", 1)[-1] for n in missing}  # weight, bias, ...
        unused = sorted(n for n in planned if n not in names and n.rsplit(".", 1)[-1] in kinds)
        renamed = (f" (it lists {', '.join(unused[:2])}, which transformers names otherwise in "
                   "the model it builds)") if unused else ""
        raise ChainConfigError(
            f"mergekit's architecture definition for {arch_label} does not list {shown}{renamed}; "
            f"{METHOD_NAME} cannot run a layer it cannot load"
        )
