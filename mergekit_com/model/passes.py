"""One calibration batch through one decoder layer, paused at the input of chosen linears.

The chain solves a layer's linears group by group (q/k/v, then o, then
gate/up, then down for Llama), and group g's inputs depend on the merged
groups before it. A ``LayerPass`` runs the layer's own ``forward`` and stops
at the first linear of each group; the walk reads that input, solves the
group over every batch, installs the merged weights in the module, and
resumes the pass, which carries on from where it stopped: every token goes
through the layer once, whatever the architecture (llm-compressor reaches
the same by tracing the model into subgraphs; a paused Python frame needs
no tracing).

The pause is a greenlet switch from a forward pre-hook. A paused pass keeps
its intermediate activations alive; a pass made with ``keep=False`` keeps
nothing and instead restarts from the layer input for each group, which
costs a partial forward per group but no memory. Both give the same values.
A pass that is not run to its end must be ``close``d.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import greenlet
import torch
from torch import nn

from mergekit_com.model.stepping import LayerCall, first_output


class _PassGreenlet(greenlet.greenlet):
    stops: Mapping[nn.Module, str] = {}


def _pause_here(module: nn.Module, args) -> None:
    key = getattr(greenlet.getcurrent(), "stops", {}).get(module)
    if key is not None:
        # no local reference to the current greenlet: its paused frame would keep it alive
        greenlet.getcurrent().parent.switch((key, args[0]))


class PausableLayer:
    """A layer module whose linears named in ``stops`` pause a running pass at their input."""

    def __init__(self, module: nn.Module, stops: Mapping[str, str]):
        self.module = module
        self.stops: Dict[nn.Module, str] = {module.get_submodule(n): key for n, key in stops.items()}
        self._handles = [m.register_forward_pre_hook(_pause_here) for m in self.stops]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class LayerPass:
    """``layer`` run on one batch; ``input_of(key)`` for each stop in call order, then ``output()``."""

    def __init__(self, layer: PausableLayer, hidden: torch.Tensor, call: LayerCall,
                 keep: bool = True):
        self.layer, self.hidden, self.call, self.keep = layer, hidden, call, keep
        self._run: Optional[_PassGreenlet] = None  # a kept pass, paused at its last stop

    def _start(self) -> _PassGreenlet:
        module, hidden, call = self.layer.module, self.hidden, self.call

        def body() -> torch.Tensor:
            # no grad context here: one left paused would restore its grad mode whenever
            # the pass is collected; ``_step`` switches in under no_grad instead
            return first_output(module(hidden, *call.args, **call.kwargs))

        run = _PassGreenlet(body)
        run.stops = self.layer.stops
        return run

    def _step(self, run: _PassGreenlet) -> Tuple[Optional[str], object]:
        """Resume ``run`` until its next stop: (key, input), or (None, output) at the end."""
        with torch.no_grad():
            got = run.switch()
        return (None, got) if run.dead else got

    def input_of(self, key: str) -> torch.Tensor:
        """The input of the linear group ``key`` (with the weights installed now)."""
        run = self._run if self.keep and self._run is not None else self._start()
        while True:
            at, value = self._step(run)
            if at is None:
                raise RuntimeError(f"the layer's forward never reached {key}")
            if at == key:
                break
        if self.keep:
            self._run = run
        return value

    def output(self) -> torch.Tensor:
        """The hidden states leaving the layer."""
        run = self._run if self.keep and self._run is not None else self._start()
        self._run = None
        while True:
            at, value = self._step(run)
            if at is None:
                return value

    def close(self) -> None:
        """Unwind a paused forward now (not whenever the garbage collector gets to it)."""
        run, self._run = self._run, None
        if run is not None and not run.dead:
            with torch.no_grad():
                run.throw()  # GreenletExit inside the paused forward
