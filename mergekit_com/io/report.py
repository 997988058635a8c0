"""``com_report.json``: how well each layer's merge fits each expert, and how far
the merged model's activations drift from each expert's own.

For every decoder layer (and the head) and every expert t:

* relative residual of the regression, per linear:
  ``||X_t (W_merged - W_t)^T||_F / ||X_t W_t^T||_F`` on the inputs ``X_t`` the
  solve used for expert t (so it depends on ``chain``), with the bias as an
  extra column on a constant input. Computed from the Gram ``X_t^T X_t`` the
  solve already has (no pass over the tokens), in float32: a diagnostic's precision. The per-layer value aggregates the
  layer's linears: ``sqrt(sum of squared numerators / sum of squared
  denominators)``.
* covariate shift: ``||H_merged - H_own||_F / ||H_own||_F`` over expert t's
  non-padding calibration tokens, where ``H`` are the hidden states entering
  the layer in the merged model (as written) and in expert t's own model.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch

from mergekit_com.method import distributed, linalg
from mergekit_com.method.parameters import METHOD_NAME, PAPER_URL

REPORT_NAME = "com_report.json"
FORMAT = "mergekit-com report 1"

DEFINITIONS = {
    "relative_residual": (
        "per expert t: ||X_t (W_merged - W_t)^T|| / ||X_t W_t^T|| (Frobenius) on the inputs "
        "X_t the solve used for expert t; bias as a column on a constant input. Per linear "
        "under 'linears'; the layer value aggregates its linears: sqrt(sum num^2 / sum den^2)"
    ),
    "covariate_shift": (
        "per expert t: ||H_merged - H_t|| / ||H_t|| (Frobenius) over expert t's calibration "
        "tokens, H = hidden states entering the layer in the merged model and in expert t's "
        "own model; measured on a sample of expert t's longest records, at most 256 tokens "
        "(experts[t].covariate_shift_tokens), unless exact_shift is true or the chain and "
        "objective run both models on every batch anyway"
    ),
    "alpha": (
        "alpha: auto only -- per linear, each expert's off-diagonal keep ratio estimated from "
        "its calibration data (Ledoit-Wolf intensity towards the diagonal)"
    ),
    "blend": (
        "objective: blend with blend: auto only -- per linear, the share of the match_expert "
        "target chosen on held-out calibration sequences"
    ),
}


class _Ratio:
    """Sums of squared numerators and denominators; the ratio of their roots."""

    __slots__ = ("num", "den", "count")

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0
        self.count = 0  # tokens measured

    def add(self, num: float, den: float, count: int = 0) -> None:
        self.num += max(num, 0.0)  # a Gram quadratic form can round below 0
        self.den += den
        self.count += count

    def state(self) -> List[float]:
        return [self.num, self.den, self.count]

    def restore(self, state: List[float]) -> None:
        self.num, self.den = state[0], state[1]
        self.count = int(state[2]) if len(state) > 2 else 0

    def value(self) -> Optional[float]:
        if self.den <= 0:
            return None
        return math.sqrt(self.num / self.den)


def summarize(values) -> Any:
    """One value, or ``{"varies": [...]}`` when per-tensor overrides give several."""
    distinct = sorted(set(values), key=repr)
    if len(distinct) == 1:
        return distinct[0]
    return {"varies": distinct}


class MergeReport:
    def __init__(self, experts: List[str], settings: Dict[str, Any]):
        self.experts = experts
        self.settings = settings
        self.calibration: List[Optional[Dict[str, Any]]] = [None] * len(experts)
        self.weights: List[Optional[float]] = [None] * len(experts)
        self._order: List[str] = []
        self._shift: Dict[str, List[_Ratio]] = {}
        self._residual: Dict[str, Dict[str, List[_Ratio]]] = defaultdict(dict)
        self.runtime: Dict[str, Any] = {}  # where and how the walk ran: device, threads, ranks
        self._alpha: Dict[str, Dict[str, List[float]]] = defaultdict(dict)
        self._blend: Dict[str, Dict[str, float]] = defaultdict(dict)

    def _layer(self, layer: str) -> None:
        if layer not in self._shift:
            self._order.append(layer)
            self._shift[layer] = [_Ratio() for _ in self.experts]

    def set_calibration(self, index: int, cal, weight: Any) -> None:
        # no local path: the report ships with the model
        self.calibration[index] = {**cal.origin, "samples": cal.num_records,
                                   "tokens": cal.num_tokens}
        self.weights[index] = weight

    def add_shift(self, layer: str, index: int, merged: torch.Tensor, own: torch.Tensor) -> None:
        """One batch of hidden states (valid tokens only) entering ``layer``."""
        self._layer(layer)
        # in the states' dtype, each column's sum of squares added in float64 (linalg.inner):
        # the difference is taken first, so nothing cancels
        diff, own = (merged - own).flatten(1), own.flatten(1)
        self._shift[layer][index].add(linalg.inner(diff, diff), linalg.inner(own, own), merged.shape[0])

    def sum_shift_over_ranks(self, layer: str, device: torch.device) -> None:
        """Under torchrun each rank saw its own share of the tokens: add the shares up."""
        ratios = self._shift[layer]
        sums = torch.tensor([r.state() for r in ratios], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(sums)
        for r, state in zip(ratios, sums.tolist()):
            r.restore(state)

    def add_residual(self, layer: str, linear: str, index: int, gram: torch.Tensor,
                     target: torch.Tensor, merged: torch.Tensor,
                     target_norm: Optional[float] = None) -> None:
        """``target``/``merged``: ``[out, in]`` (bias column included); ``gram``: ``[in, in]``;
        ``target_norm``: ``tr(W G W^T)`` of the target where the solve had it (then it
        costs no product here)."""
        self._layer(layer)
        ratios = self._residual[layer].setdefault(linear, [_Ratio() for _ in self.experts])
        # Diagnostic precision is enough: float32 products (the difference is taken
        # first, so nothing cancels).
        gram32 = gram.to(torch.float32)
        diff = (merged.double() - target.double()).to(torch.float32)
        num = linalg.gram_inner(diff, gram32).item()
        if target_norm is None:
            target_norm = linalg.gram_inner(target.to(torch.float32), gram32).item()
        ratios[index].add(num, target_norm)

    def add_alpha(self, layer: str, linear: str, alphas: List[float]) -> None:
        """The keep ratios ``alpha: auto`` chose for one linear, one per expert."""
        self._layer(layer)
        self._alpha[layer][linear] = [float(a) for a in alphas]

    def add_blend(self, layer: str, linear: str, share: float) -> None:
        """The share of the match_expert target ``blend: auto`` chose for one linear."""
        self._layer(layer)
        self._blend[layer][linear] = float(share)

    def layer_state(self, layer: str) -> Dict[str, Any]:
        """This layer's running sums, for a checkpoint (exact: JSON keeps floats)."""
        return {
            "shift": [r.state() for r in self._shift.get(layer, [])],
            "residual": {k: [r.state() for r in v]
                         for k, v in self._residual.get(layer, {}).items()},
            "alpha": dict(self._alpha.get(layer, {})),
            "blend": dict(self._blend.get(layer, {})),
        }

    def restore_layer(self, layer: str, state: Dict[str, Any]) -> None:
        """Entries of a layer merged before a resume, as ``layer_state`` gave them."""
        self._layer(layer)

        def fill(ratios, states):
            for r, state in zip(ratios, states):
                r.restore(state)

        fill(self._shift[layer], state["shift"])
        for linear, pairs in state["residual"].items():
            fill(self._residual[layer].setdefault(linear, [_Ratio() for _ in self.experts]), pairs)
        for linear, alphas in state.get("alpha", {}).items():
            self._alpha[layer][linear] = list(alphas)
        self._blend[layer].update(state.get("blend", {}))

    def to_dict(self) -> Dict[str, Any]:
        layers = []
        for name in self._order:
            linears = self._residual.get(name, {})
            total = []
            for t in range(len(self.experts)):
                agg = _Ratio()
                for ratios in linears.values():
                    agg.add(ratios[t].num, ratios[t].den)
                total.append(agg.value())
            layers.append({
                "name": name,
                "covariate_shift": [r.value() for r in self._shift[name]],
                "relative_residual": total if linears else None,
                "linears": {k: [r.value() for r in v] for k, v in linears.items()},
                **({"alpha": dict(self._alpha[name])} if self._alpha.get(name) else {}),
                **({"blend": dict(self._blend[name])} if self._blend.get(name) else {}),
            })
        return {
            "format": FORMAT,
            "method": METHOD_NAME,
            "paper": PAPER_URL,
            "settings": self.settings,
            "definitions": DEFINITIONS,
            "experts": [
                {"model": m, "weight": w, "calibration": c, "covariate_shift_tokens": n}
                for m, w, c, n in zip(self.experts, self.weights, self.calibration,
                                      self._shift_tokens())
            ],
            "layers": layers,
            "runtime": self.runtime,
        }

    def _shift_tokens(self) -> List[int]:
        """Per expert, the tokens the covariate shift was measured on (at the first layer)."""
        if not self._order:
            return [0] * len(self.experts)
        return [r.count for r in self._shift[self._order[0]]]

    def write(self, out_dir: str) -> str:
        path = os.path.join(out_dir, REPORT_NAME)
        with open(path, "w", encoding="utf-8") as fp:
            json.dump(self.to_dict(), fp, indent=1)
            fp.write("\n")
        return path
