"""The named choices of the method: where a linear's inputs come from (``chain``) and
what its merged weight is fitted to reproduce (``objective``).

The whole difference between Chain of Merges and RegMean is the first: CoM
measures every linear's inputs in the merged model, RegMean in each expert's
own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, NamedTuple, Optional, Sequence

import torch

from mergekit_com.method import linalg
from mergekit_com.method.parameters import AUTO, Chain, Objective, SolveSettings, relative_weights


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


class Solved(NamedTuple):
    """A linear's merged ``[out, in]`` weight and, where the solve formed each expert's
    ``G_t W_t^T`` on the way, ``tr(W_t G_t W_t^T)``: the merge report's residuals divide by
    them (they cost no product then)."""

    weight: torch.Tensor
    target_norms: Optional[List[float]] = None


class BlendObjective:
    """Fit a mix of both targets: with share ``b`` (``blend``), each expert contributes
    ``(1 - b) ||X_t V - X_t W_t^T||^2 + b ||X_t V - Z_t W_t^T||^2`` (over its tokens):
    ``V = (sum_t w_t G~_t + eps I)^-1 sum_t w_t ((1 - b) G~_t + b C~_t) W_t^T`` with
    ``C_t = X_t^T Z_t / n_t``. ``b = 0`` is regmean, ``b = 1`` match_expert, and
    ``blend: auto`` picks ``b`` per linear on held-out sequences (``linalg.held_out_blend``).
    Every expert's Gram and cross moment are shrunk by its ``alpha`` (``auto``: its
    Ledoit-Wolf estimate, ``linalg.shrinkage_alpha``).
    """

    name = Objective.BLEND
    needs_expert_inputs = True
    fixed_share = None  # the share this objective always uses (None: the `blend` parameter)
    uses_alpha = True

    def share(self, settings: SolveSettings):
        return self.fixed_share if self.fixed_share is not None else settings.blend

    def solve(self, stats: linalg.SharedInputStats, experts: List[Hashable],
              targets: Sequence[torch.Tensor], settings: SolveSettings, name: str) -> Solved:
        weights = relative_weights(settings.weights)
        alphas = stats.alphas(experts, settings.alpha if self.uses_alpha else 1.0)
        share = self.share(settings)
        products = None
        if share == AUTO:
            products = linalg.fold_products(stats, experts, weights, targets, name)
            share = linalg.held_out_blend(stats, experts, weights, targets, alphas, settings.ridge, name,
                                          products)
        stats.last_blend = share
        solver = stats.solver(experts, weights, alphas, settings.ridge, name)
        if products is not None:  # the folds' products sum to the whole data's
            rhs = linalg.fold_blend_rhs(stats, experts, weights, alphas, share, products)
            norms = linalg.fold_target_norms(stats, experts, products)
        else:
            rhs, norms = linalg.stats_blend_rhs(stats, experts, weights, alphas, share, targets, name)
        return Solved(solver.solve(rhs).T, norms)


class RegMeanObjective(BlendObjective):
    """Fit each expert's weights on its inputs:
    ``V = (sum_t w_t G~_t + eps I)^-1 sum_t w_t G~_t W_t^T``."""

    name = Objective.REGMEAN
    needs_expert_inputs = False  # Z_t, the inputs of expert t's own model
    fixed_share = 0.0


class MatchExpertObjective(BlendObjective):
    """Fit what expert t's own layer outputs on its own activations ``Y_t = Z_t W_t^T``:
    ``V = (sum_t w_t X_t^T X_t / n_t + eps I)^-1 sum_t w_t X_t^T Y_t / n_t``.

    The solve also corrects the drift of the merged prefix. It fits the raw
    moments (``alpha`` is not used; ``objective: blend`` with ``blend: 1`` is
    this objective with the shrinkage).
    """

    name = Objective.MATCH_EXPERT
    needs_expert_inputs = True
    fixed_share = 1.0
    uses_alpha = False


OBJECTIVES = {Objective.REGMEAN: RegMeanObjective(), Objective.MATCH_EXPERT: MatchExpertObjective(),
              Objective.BLEND: BlendObjective()}
