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

A pass of a layer whose weights are not being merged (an expert's own) may
also run on past a group, to the next stop, and hand over the outputs of the
group's linears (``input_and_outputs``): the targets ``Y = Z W^T`` that
forward computed anyway, or what a given function takes of them as they are made
(the real tokens' rows: one copy instead of a copy and a gather).
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import greenlet
import torch
from torch import nn

from mergekit_com.model.stepping import LayerCall, first_output

Step = Tuple[Optional[str], object]  # (stop key, its input), or (None, the layer's output)


class _PassGreenlet(greenlet.greenlet):
    stops: Mapping[nn.Module, str] = {}
    outputs_of: Mapping[nn.Module, str] = {}  # the modules whose outputs are handed over
    captured: Optional[Dict[str, torch.Tensor]] = None  # while capturing: name -> first output
    keep: Callable[[torch.Tensor], torch.Tensor] = torch.clone  # what is kept of an output


def _pause_here(module: nn.Module, args) -> None:
    key = getattr(greenlet.getcurrent(), "stops", {}).get(module)
    if key is not None:
        # no local reference to the current greenlet: its paused frame would keep it alive
        greenlet.getcurrent().parent.switch((key, args[0]))


def _capture_here(module: nn.Module, args, output) -> None:
    captured = getattr(greenlet.getcurrent(), "captured", None)
    if captured is not None:
        name = greenlet.getcurrent().outputs_of[module]
        if name not in captured:  # a copy: the forward may go on to change its output in place
            captured[name] = greenlet.getcurrent().keep(output)


class PausableLayer:
    """A layer module whose linears named in ``stops`` pause a running pass at their input;
    the outputs of those named in ``outputs`` can be handed over (``input_and_outputs``)."""

    def __init__(self, module: nn.Module, stops: Mapping[str, str], outputs: Sequence[str] = ()):
        self.module = module
        self.stops: Dict[nn.Module, str] = {module.get_submodule(n): key for n, key in stops.items()}
        self.outputs_of: Dict[nn.Module, str] = {module.get_submodule(n): n for n in outputs}
        self._handles = [m.register_forward_pre_hook(_pause_here) for m in self.stops]
        self._handles += [m.register_forward_hook(_capture_here) for m in self.outputs_of]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class LayerPass:
    """``layer`` run on one batch; ``input_of(key)`` for each stop in call order, then ``output()``.

    ``hidden`` gives the batch's hidden states entering the layer; it is called
    each time the pass (re)starts, so a pass that is not kept holds nothing.
    """

    def __init__(self, layer: PausableLayer, hidden: Callable[[], torch.Tensor], call: LayerCall,
                 keep: bool = True):
        self.layer, self.hidden, self.call, self.keep = layer, hidden, call, keep
        self._run: Optional[_PassGreenlet] = None  # a kept pass, paused at its last stop
        self._ahead: Optional[Step] = None  # the kept pass's next step, taken already

    def _start(self) -> _PassGreenlet:
        module, hidden, call = self.layer.module, self.hidden(), self.call

        def body() -> torch.Tensor:
            # no grad context here: one left paused would restore its grad mode whenever
            # the pass is collected; ``_step`` switches in under no_grad instead
            return first_output(module(hidden, *call.args, **call.kwargs))

        run = _PassGreenlet(body)
        run.stops, run.outputs_of = self.layer.stops, self.layer.outputs_of
        return run

    def _step(self, run: _PassGreenlet) -> Step:
        """Resume ``run`` until its next stop: (key, input), or (None, output) at the end."""
        with torch.no_grad():
            got = run.switch()
        return (None, got) if run.dead else got

    def _resume(self) -> Tuple[_PassGreenlet, Optional[Step]]:
        """The kept pass and the step it took ahead, or a fresh pass; this pass holds neither."""
        if self.keep and self._run is not None:
            run, ahead = self._run, self._ahead
        else:
            run, ahead = self._start(), None
        self._run = self._ahead = None
        return run, ahead

    def _reach(self, key: str) -> Tuple[_PassGreenlet, torch.Tensor]:
        run, ahead = self._resume()
        while True:
            at, value = ahead if ahead is not None else self._step(run)
            ahead = None
            if at is None:
                raise RuntimeError(f"the layer's forward never reached {key}")
            if at == key:
                return run, value

    def input_of(self, key: str) -> torch.Tensor:
        """The input of the linear group ``key`` (with the weights installed now)."""
        run, value = self._reach(key)
        if self.keep:
            self._run = run
        return value

    def input_and_outputs(self, key: str, names: Sequence[str],
                          keep: Callable[[torch.Tensor], torch.Tensor] = torch.clone,
                          ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The input of the group ``key`` and the outputs of its linears ``names`` (among the
        layer's ``outputs``) on it: the pass runs on to its next stop. Only for a layer whose
        weights stay as they are: the rest of the pass runs on them now. What is handed over
        of each output is ``keep(output)``, called as the linear returns it: a new tensor (a
        copy, or a gather of some rows), since the forward may change the output in place."""
        run, value = self._reach(key)
        run.captured, run.keep = {}, keep
        try:
            ahead = self._step(run)
        finally:
            captured, run.captured = run.captured, None
        missing = [n for n in names if n not in captured]
        if missing:
            raise RuntimeError(f"the layer's forward never called {', '.join(missing)} after {key}")
        if self.keep:
            self._run, self._ahead = run, ahead
        elif not run.dead:
            with torch.no_grad():
                run.throw()
        return value, {n: captured[n] for n in names}

    def output(self) -> torch.Tensor:
        """The hidden states leaving the layer."""
        run, ahead = self._resume()
        while True:
            at, value = ahead if ahead is not None else self._step(run)
            ahead = None
            if at is None:
                return value

    def close(self) -> None:
        """Unwind a paused forward now (not whenever the garbage collector gets to it)."""
        self._ahead = None
        run, self._run = self._run, None
        if run is not None and not run.dead:
            with torch.no_grad():
                run.throw()  # GreenletExit inside the paused forward
