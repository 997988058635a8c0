"""The mergekit-facing declaration of ``chain_of_merges`` and its parameters.

mergekit plans one task per output tensor and calls ``merge_group`` for each.
For CoM those calls happen inside the layer walk (see ``engine.py``), which
publishes the solved linear weights in a ``ChainContext``; every other tensor
(embeddings, norms, ...) is merged here by the fallback rule.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Hashable, Optional

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

METHOD_NAME = "chain_of_merges"
PAPER_URL = "https://arxiv.org/abs/2508.21421"

CHAINS = ("module", "block", "none")
OBJECTIVES = ("regmean", "match_expert")
FALLBACKS = ("average", "task_arithmetic")
ACTIVATION_DTYPES = ("auto", "float32", "bfloat16", "float16")

# name -> (type, scope, default, description). The single source of truth for
# the spec, the validation and the README's parameter table.
PARAMETERS: Dict[str, tuple] = {
    "chain": (str, ParameterScope.SHARED, "module",
              "where each linear's inputs come from: `module` (CoM: the merged model so far, "
              "inside the block too), `block` (merged block inputs, expert's own block), "
              "`none` (expert's own model: plain RegMean)"),
    "objective": (str, ParameterScope.SHARED, "regmean",
                  "`regmean`: fit each expert's weights on its inputs; `match_expert`: fit "
                  "what expert t's own layer outputs on its own activations"),
    "alpha": (float, ParameterScope.SHARED, 0.9,
              "off-diagonal keep ratio of each Gram, in [0, 1] (1 = no shrinkage)"),
    "ridge": (float, ParameterScope.SHARED, 1e-5,
              "ridge added to the summed Gram, relative to its mean diagonal"),
    "num_samples": (int, ParameterScope.SHARED, 128,
                    "first N records of each calibration file"),
    "max_seq_len": (int, ParameterScope.SHARED, 512, "tokens kept per record"),
    "batch_size": (int, ParameterScope.SHARED, 8, "sequences per forward pass"),
    "activation_dtype": (str, ParameterScope.SHARED, "auto",
                         "dtype of the cached activations between layers: `auto` (bfloat16 on "
                         "GPU, float32 on CPU), `float32`, `bfloat16`, `float16`; Grams are "
                         "always summed in float32 or better"),
    "activation_budget": (float, ParameterScope.SHARED, 0.0,
                          "GB of activations kept on the compute device before spilling to CPU "
                          "memory, then disk; 0 = half the free memory at start"),
    "fallback": (str, ParameterScope.SHARED, "average",
                 "rule for non-linear tensors (embeddings, norms): `average` or "
                 "`task_arithmetic` (needs `base_model`)"),
    "lambda": (float, ParameterScope.SHARED, 1.0,
               "scale of the summed task vectors under `fallback: task_arithmetic`"),
    "calibration": (Optional[str], ParameterScope.INPUT, None,
                    "per model: calibration data (.jsonl/.json with `text` or `messages`, "
                    ".txt, .parquet, or a `datasets` directory)"),
    "weight": (float, ParameterScope.INPUT, 1.0,
               "per model: weight of this expert in every solve and average"),
}

# These shape the walk itself, so one value must hold for every tensor.
GLOBAL_ONLY = ("chain", "objective", "num_samples", "max_seq_len", "batch_size",
               "activation_dtype", "activation_budget")


@dataclass
class ChainContext:
    """What the running walk tells ``merge_group``."""

    experts: FrozenSet[Hashable]
    solutions: Dict[str, torch.Tensor] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[Optional[ChainContext]] = contextvars.ContextVar(
    "mergekit_com_active_chain", default=None
)


def activate(ctx: Optional[ChainContext]) -> contextvars.Token:
    return _ACTIVE.set(ctx)


def deactivate(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)


def fallback_merge(
    group: TensorGroup,
    experts: FrozenSet[Hashable],
    *,
    rule: str,
    weight: Dict[Hashable, float],
    scale: float,
) -> torch.Tensor:
    """Weighted average of the experts, or task arithmetic around the base."""
    entries = [e for e in group.entries if e.id in experts]
    if not entries:
        # e.g. a tensor only the base has: keep it.
        return group.entries[0].tensor
    dtype = torch.float64 if entries[0].tensor.dtype == torch.float64 else torch.float32
    if rule == "task_arithmetic":
        base = group.base.tensor.to(dtype)
        delta = sum(weight[e.id] * (e.tensor.to(dtype) - base) for e in entries)
        return base + scale * delta
    total = sum(weight[e.id] for e in entries)
    if total <= 0:
        raise ValueError(
            f"{group.metadata.name}: the expert weights sum to {total}; give at "
            "least one model a positive `weight`"
        )
    return sum(weight[e.id] * e.tensor.to(dtype) for e in entries) / total


class ChainOfMergesMethod(GroupMergeMethod):
    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="Chain of Merges",
        reference_url=PAPER_URL,
        parameters=tuple(
            ParameterSpec(name, ty, scope, default=default, description=desc)
            for name, (ty, scope, default, desc) in PARAMETERS.items()
        ),
        contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
        uses_accelerator=True,
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        ctx = _ACTIVE.get()
        if ctx is None:
            raise RuntimeError(
                f"{METHOD_NAME} needs its calibration walk: run it through "
                "mergekit-yaml, mergekit-com or mergekit.merge.run_merge, not "
                "per-tensor APIs"
            )
        name = group.metadata.name
        if name in ctx.solutions:
            return ctx.solutions[name].to(group.entries[0].tensor.dtype)
        return fallback_merge(
            group,
            ctx.experts,
            rule=parameters["fallback"],
            weight=dict(parameters["weight"].items()),
            scale=parameters["lambda"],
        )


chain_of_merges = ChainOfMergesMethod()


def register() -> None:
    from mergekit.merge_methods import registry

    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(chain_of_merges)


register()
