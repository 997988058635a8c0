"""Check every linear of a CoM output against the closed form, for any architecture.

Under ``chain: module`` each linear's inputs are exactly those the final
merged model gives it, so forward hooks on the *output* model reproduce
every solve: ``W = (sum_t w_t G~_t + eps I)^-1 sum_t w_t G~_t W_t^T`` with
``G_t`` from expert t's calibration texts. Conv1D weights are ``[in, out]``;
a bias is solved as an extra column on a constant input.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tests.support.closed_form import captured_inputs, regmean, texts_of
from tests.support.merging import read_tensors

LINEARS = (torch.nn.Linear, Conv1D)


def linear_modules(model_dir: str) -> Dict[str, bool]:
    """Name -> is Conv1D, for every linear the output model has."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {n: isinstance(m, Conv1D) for n, m in model.named_modules() if isinstance(m, LINEARS)}


def _augmented(tensors, name: str, conv: bool, biased: bool) -> torch.Tensor:
    w = tensors[f"{name}.weight"]
    w = w.T if conv else w
    if biased:
        w = torch.cat([w, tensors[f"{name}.bias"][:, None]], dim=1)
    return w


def assert_every_linear_is_closed_form(
    out_dir: str, expert_dirs: Sequence[str], data_files: Sequence[str], *,
    alpha: Callable[[str], float], ridge: float,
    weights: Optional[Callable[[str], List[float]]] = None,
    source_name: Callable[[str], str] = lambda n: n,
    max_rel_err: float = 1e-4,
) -> List[str]:
    """Asserts; returns the linears checked (those written, e.g. not a tied lm_head)."""
    merged = read_tensors(out_dir)
    modules = {n: c for n, c in linear_modules(out_dir).items() if f"{n}.weight" in merged}
    caps = [captured_inputs(out_dir, texts_of(d), list(modules)) for d in data_files]
    experts = [read_tensors(d) for d in expert_dirs]
    for name, conv in modules.items():
        biased = f"{name}.bias" in merged
        xs = [c[name] for c in caps]
        if biased:
            xs = [torch.cat([x, torch.ones(x.shape[0], 1)], dim=1) for x in xs]
        src = source_name(name)
        ws = [_augmented(e, src, conv, biased) for e in experts]
        expected = regmean(xs, ws, alpha(name), ridge, weights(name) if weights else None)
        got = _augmented(merged, name, conv, biased).double()
        err = ((got - expected).norm() / expected.norm()).item()
        assert err < max_rel_err, f"{name}: relative error {err:.2e}"
    return list(modules)
