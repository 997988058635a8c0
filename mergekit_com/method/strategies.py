"""The named choices of the method: where a linear's inputs come from (``chain``) and
what its merged weight is fitted to reproduce (``objective``).

The whole difference between Chain of Merges and RegMean is the first: CoM
measures every linear's inputs in the merged model, RegMean in each expert's
own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Sequence

import torch

from mergekit_com.method import linalg
from mergekit_com.method.parameters import Chain, Objective, SolveSettings


@dataclass(frozen=True)
class ChainStrategy:
    """Which hidden states enter the layer, and whose weights run inside it, for ``X_t``."""

    name: Chain
    stream: str  # "merged": the merged model's hidden states; "own": expert t's own model's
    inside: str  # "merged": the merged layer so far; "own": expert t's own layer


CHAINS = {
    Chain.MODULE: ChainStrategy(Chain.MODULE, stream="merged", inside="merged"),
    Chain.BLOCK: ChainStrategy(Chain.BLOCK, stream="merged", inside="own"),
    Chain.NONE: ChainStrategy(Chain.NONE, stream="own", inside="own"),
}


class RegMeanObjective:
    """Fit each expert's weights on its inputs:
    ``V = (sum_t w_t G~_t + eps I)^-1 sum_t w_t G~_t W_t^T``."""

    name = Objective.REGMEAN
    needs_expert_inputs = False  # Z_t, the inputs of expert t's own model

    def solve(self, stats: linalg.SharedInputStats, experts: List[Hashable],
              targets: Sequence[torch.Tensor], settings: SolveSettings, name: str) -> torch.Tensor:
        weights = list(settings.weights)
        solver = stats.solver(experts, weights, settings.alpha, settings.ridge, name)
        rhs = linalg.regmean_rhs([stats.grams[e] for e in experts], weights, settings.alpha, targets)
        return solver.solve(rhs).T


class MatchExpertObjective:
    """Fit what expert t's own layer outputs on its own activations ``Y_t = Z_t W_t^T``:
    ``V = (sum_t w_t X_t^T X_t / n_t + eps I)^-1 sum_t w_t X_t^T Y_t / n_t``.

    The solve also corrects the drift of the merged prefix. The shrinkage
    ``alpha`` is a RegMean device: this objective fits the raw Grams.
    """

    name = Objective.MATCH_EXPERT
    needs_expert_inputs = True

    def solve(self, stats: linalg.SharedInputStats, experts: List[Hashable],
              targets: Sequence[torch.Tensor], settings: SolveSettings, name: str) -> torch.Tensor:
        weights = list(settings.weights)
        solver = stats.solver(experts, weights, 1.0, settings.ridge, name)
        rhs = linalg.match_expert_rhs([stats.crosses[e] for e in experts], weights, targets)
        return solver.solve(rhs).T


OBJECTIVES = {Objective.REGMEAN: RegMeanObjective(), Objective.MATCH_EXPERT: MatchExpertObjective()}
