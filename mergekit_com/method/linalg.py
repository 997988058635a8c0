"""The closed-form math of RegMean / Chain of Merges, free of mergekit and HF.

Orientation: activations are rows, ``X`` is ``[n, in]``; HF ``Linear.weight``
is ``[out, in]``, so the regression solves for ``V = W^T`` (``[in, out]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence

import torch

LOG = logging.getLogger("mergekit.chain_of_merges.linalg")  # under mergekit's logger


@dataclass
class Moments:
    """Running sums of ``X^T X`` (and optionally ``X^T Z``) over tokens.

    Each batch's product is formed in the activations' dtype (one matmul per
    batch, never per token) and added into a float64 accumulator, so long
    calibration sets do not lose precision.
    """

    gram: Optional[torch.Tensor] = None
    cross: Optional[torch.Tensor] = None
    count: int = 0

    def add(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> None:
        if x.shape[0] == 0:
            return
        g = (x.T @ x).to(torch.float64)
        self.gram = g if self.gram is None else self.gram.add_(g)
        if z is not None:
            c = (x.T @ z).to(torch.float64)
            self.cross = c if self.cross is None else self.cross.add_(c)
        self.count += x.shape[0]

    def mean_gram(self) -> torch.Tensor:
        if self.gram is None or self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.gram / self.count

    def mean_cross(self) -> torch.Tensor:
        if self.cross is None or self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.cross / self.count


def with_ones_column(x: torch.Tensor) -> torch.Tensor:
    """Append a constant input so a bias is solved jointly with its weight."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: RegMean's off-diagonal shrinkage."""
    if alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal().add_(gram.diagonal() * (1.0 - alpha))
    return out


class RidgeSolver:
    """One Cholesky factorisation of ``sum_t w_t A_t + eps I``, many right-hand sides.

    ``eps = ridge * mean(diag)``. Linears that share an input (q/k/v, gate/up)
    share the left-hand side, so they share this object and its factor.
    """

    def __init__(self, lhs: torch.Tensor, ridge: float, name: str = "layer"):
        lhs = lhs.to(torch.float64)
        scale = lhs.diagonal().mean().item()
        if not torch.isfinite(lhs).all():
            raise FloatingPointError(f"non-finite calibration statistics for {name}")
        if scale <= 0:
            # Every input feature is zero on every token: nothing to fit.
            scale = 1.0
        eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
        eps = max(ridge, 0.0) * scale
        for attempt in range(8):
            factor, info = torch.linalg.cholesky_ex(lhs + eps * eye)
            if info.item() == 0:
                break
            # Rank-deficient Gram (e.g. fewer tokens than input features):
            # regularise harder rather than return NaN.
            eps = max(eps * 100.0, 1e-10 * scale)
            LOG.warning(
                "%s: calibration Gram is singular; raising the ridge to %.3g "
                "(give more calibration tokens or a smaller alpha)",
                name,
                eps / scale,
            )
        else:  # pragma: no cover - only reachable with adversarial input
            raise FloatingPointError(f"could not factorise the Gram of {name}")
        self.factor = factor
        self.eps = eps

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs.to(torch.float64), self.factor)


def regmean_lhs(
    grams: Sequence[torch.Tensor], weights: Sequence[float], alpha: float
) -> torch.Tensor:
    return sum(w * shrink(g, alpha) for g, w in zip(grams, weights))


def regmean_rhs(
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float,
    expert_weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``sum_t w_t G~_t W_t^T`` with ``W_t`` given HF-style ``[out, in]``."""
    return sum(
        w * (shrink(g, alpha) @ wt.to(torch.float64).T)
        for g, w, wt in zip(grams, weights, expert_weights)
    )


def match_expert_rhs(
    crosses: Sequence[torch.Tensor],
    weights: Sequence[float],
    expert_weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``sum_t w_t X_t^T Y_t / n_t`` with ``Y_t = Z_t W_t^T``, i.e. ``C_t W_t^T``."""
    return sum(
        w * (c @ wt.to(torch.float64).T)
        for c, w, wt in zip(crosses, weights, expert_weights)
    )


@dataclass
class SharedInputStats:
    """Per-expert mean statistics of one input shared by several linears."""

    grams: Dict[Hashable, torch.Tensor]
    crosses: Dict[Hashable, torch.Tensor] = field(default_factory=dict)
    _solvers: Dict[tuple, RidgeSolver] = field(default_factory=dict)

    def solver(
        self,
        experts: List[Hashable],
        weights: List[float],
        alpha: float,
        ridge: float,
        name: str,
    ) -> RidgeSolver:
        key = (tuple(experts), tuple(weights), alpha, ridge)
        if key not in self._solvers:
            lhs = regmean_lhs([self.grams[e] for e in experts], weights, alpha)
            self._solvers[key] = RidgeSolver(lhs, ridge, name=name)
        return self._solvers[key]
