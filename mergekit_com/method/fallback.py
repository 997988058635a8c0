"""The rule for every tensor that is not a linear's weight or bias (embeddings, norms, ...)."""

from __future__ import annotations

from typing import Hashable, Mapping, Optional

import torch

from mergekit_com.method.parameters import Fallback, relative_weights


def fallback_merge(
    experts: Mapping[Hashable, torch.Tensor],
    weights: Mapping[Hashable, float],
    *,
    rule: Fallback,
    base: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    name: str = "tensor",
) -> Optional[torch.Tensor]:
    """``average``: ``sum_t w_t theta_t / sum_t w_t``; ``task_arithmetic``:
    ``theta_base + scale * sum_t w_t (theta_t - theta_base)``.

    None when no expert has the tensor (the caller keeps what it has).
    """
    if not experts:
        return None
    first = next(iter(experts.values()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    if rule == Fallback.TASK_ARITHMETIC:
        if base is None:
            raise ValueError(f"{name}: fallback task_arithmetic needs the base model's tensor")
        origin = base.to(dtype)
        delta = sum(weights[e] * (t.to(dtype) - origin) for e, t in experts.items())
        return origin + scale * delta
    total = sum(weights[e] for e in experts)
    if total <= 0:
        raise ValueError(
            f"{name}: the expert weights sum to {total}; give at least one model a "
            "positive `weight`"
        )
    shares = dict(zip(experts, relative_weights([weights[e] for e in experts])))
    merged = sum(shares[e] * t.to(dtype) for e, t in experts.items())
    return merged / sum(shares.values())
