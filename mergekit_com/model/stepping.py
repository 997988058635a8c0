"""Stepping a transformers model forward one decoder layer at a time.

GPTQ-style: the model's own ``forward`` runs once with its decoder layers
swapped for recorders, which yields the first layer's input and the exact
arguments (masks, position embeddings, ...) every layer receives. After
that each layer runs on its own, as a module instance holding whichever
weights are wanted (merged so far, or one expert's). Nothing comes from a
per-architecture table: layer order, layer arguments and linear modules all
come from the transformers model.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
from torch import nn
from torch.func import functional_call

try:  # GPT-2 style linears store their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


class _Stop(Exception):
    """Raised from a hook once the wanted activations are captured."""


def is_transposed(module: nn.Module) -> bool:
    """Whether the module keeps its weight as ``[in, out]`` (Conv1D) instead of ``[out, in]``."""
    return not isinstance(module, nn.Linear)


@dataclass
class LayerCall:
    """Everything a decoder layer receives besides its hidden states."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


def first_output(out: Any) -> torch.Tensor:
    """A layer's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def find_layer_list(model: nn.Module, first_layer_weight: str) -> Tuple[str, nn.ModuleList]:
    """The ``ModuleList`` holding the decoder layers, found from a weight name."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and first_layer_weight.startswith(f"{name}.0."):
            if best is None or len(name) > len(best[0]):
                best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__} "
            f"(looked for the module list holding {first_layer_weight})"
        )
    return best


def _init_buffers(model: nn.Module, root: nn.Module, device: torch.device) -> None:
    """Real buffers under ``root`` (rotary inv_freq, ...); parameters are left alone.

    Non-persistent buffers are not in checkpoints; transformers' own
    initialiser knows how to compute them.
    """
    for module in root.modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        for name, buf in own.items():
            module._buffers[name] = torch.empty_like(buf, device=device)
        model._init_weights(module)


def set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` (shared, not copied) the parameter ``name`` of ``module``."""
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))


class ModelShell:
    """The output architecture as a module tree: decoder layers on meta, the rest real."""

    def __init__(self, config, first_layer_weight: str, device: torch.device,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        self.device = device
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        model.eval()
        self.layers_name, self.layers = find_layer_list(model, first_layer_weight)
        parent_name, _, attr = self.layers_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.ModuleList())
        model.to_empty(device=device)
        _init_buffers(model, model, device)
        setattr(parent, attr, self.layers)
        self.model = model
        self._templates: Dict[int, nn.Module] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_name}.{index}."

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Load one merged non-layer tensor (its shape may differ: vocab changes)."""
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        value = tensor.detach().to(device=self.device, dtype=torch.float32)
        current = getattr(module, attr)
        if isinstance(current, nn.Parameter) and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
        else:
            setattr(module, attr, nn.Parameter(value.clone(), requires_grad=False))

    def tie_embeddings(self) -> None:
        out = self.model.get_output_embeddings()
        if out is not None:
            out.weight = self.model.get_input_embeddings().weight

    def linear_names(self, index: int) -> List[str]:
        """Local names of every linear inside layer ``index``."""
        return [n for n, m in self.layers[index].named_modules() if isinstance(m, LINEAR_TYPES)]

    def instantiate(self, index: int, params: Mapping[str, torch.Tensor]) -> nn.Module:
        """Layer ``index`` as a module of its own whose parameters are ``params``.

        ``params`` maps every parameter's local name to a tensor on the device;
        the module shares those tensors (no copy) and has real buffers. One
        instance per set of weights lets forwards on different weights be
        paused and resumed independently (see ``model/passes.py``).
        """
        if index not in self._templates:
            self._templates.clear()  # one layer at a time
            template = copy.deepcopy(self.layers[index])  # parameters stay on meta
            _init_buffers(self.model, template, self.device)
            self._templates[index] = template
        module = copy.deepcopy(self._templates[index])
        for name, _ in module.named_parameters():
            if name not in params:
                raise KeyError(f"layer {index}: no value for parameter {name}")
        for name, value in params.items():
            set_parameter(module, name, value)
        return module

    def release(self) -> None:
        self._templates.clear()

    @contextlib.contextmanager
    def _swapped_layers(self, modules: Sequence[nn.Module]) -> Iterator[None]:
        originals = list(self.layers)
        for i, m in enumerate(modules):
            self.layers[i] = m
        try:
            yield
        finally:
            for i, m in enumerate(originals):
                self.layers[i] = m

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        overrides: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, List[LayerCall]]:
        """Hidden states entering layer 0 and what every layer is called with."""
        calls: List[LayerCall] = []
        first: List[torch.Tensor] = []
        last = self.num_layers - 1

        def record(index: int, hidden: torch.Tensor, args, kwargs) -> torch.Tensor:
            if index == 0:
                first.append(hidden)
            calls.append(LayerCall(args=args, kwargs=kwargs))
            if index == last:
                raise _Stop
            return hidden

        self._run_model(input_ids, attention_mask, overrides, [
            _Recorder(i, record) for i in range(self.num_layers)
        ])
        return first[0], calls

    def head_inputs(
        self,
        final_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        head: nn.Module,
        overrides: Optional[Dict[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """What ``head`` (e.g. lm_head) receives when the last layer outputs ``final_hidden``."""
        got: List[torch.Tensor] = []

        def grab(_module, args):
            got.append(args[0])
            raise _Stop

        last = self.num_layers - 1

        def replay(index: int, hidden: torch.Tensor, args, kwargs) -> torch.Tensor:
            return final_hidden if index == last else hidden

        handle = head.register_forward_pre_hook(grab)
        try:
            self._run_model(input_ids, attention_mask, overrides, [
                _Recorder(i, replay) for i in range(self.num_layers)
            ])
        finally:
            handle.remove()
        if not got:
            raise RuntimeError(f"{type(head).__name__} was never called by the model's forward")
        return got[0]

    def _run_model(self, input_ids, attention_mask, overrides, layers) -> None:
        kwargs = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        )
        with self._swapped_layers(layers), torch.no_grad():
            try:
                if overrides:
                    functional_call(self.model, overrides, args=(), kwargs=kwargs, strict=False)
                else:
                    self.model(**kwargs)
            except _Stop:
                pass


class _Recorder(nn.Module):
    def __init__(self, index: int, fn: Callable):
        super().__init__()
        self.index = index
        self.fn = fn

    def forward(self, hidden_states, *args, **kwargs):
        return self.fn(self.index, hidden_states, args, kwargs)


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """The hidden states leaving ``layer`` (a module with its own weights)."""
    with torch.no_grad():
        return first_output(layer(hidden, *call.args, **call.kwargs))


def linear_call_groups(
    layer: nn.Module, hidden: torch.Tensor, call: LayerCall, names: Sequence[str],
) -> List[List[str]]:
    """The linears ``names`` in the order the forward calls them, grouped by shared input.

    q/k/v (and gate/up) receive the very same tensor object, so identity is
    what groups them; the call order is a valid merge order because a linear's
    input can only depend on linears called before it.
    """
    order: List[Tuple[str, torch.Tensor]] = []
    handles = []
    for key in names:
        def hook(_module, args, key=key):
            if all(k != key for k, _ in order):
                order.append((key, args[0]))
        handles.append(layer.get_submodule(key).register_forward_pre_hook(hook))
    try:
        run_layer(layer, hidden, call)
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    last_input = None
    for key, x in order:
        if groups and x is last_input:
            groups[-1].append(key)
        else:
            groups.append([key])
        last_input = x
    return groups
