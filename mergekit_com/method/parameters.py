"""Every parameter of ``chain_of_merges``: name, type, scope, default, meaning, valid values.

The single source of truth: mergekit's method spec, the config checks, the
README's parameter table (tested) and the merge report are all built from
``PARAMETERS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mergekit_com.errors import ChainConfigError

METHOD_NAME = "chain_of_merges"
PAPER_URL = "https://arxiv.org/abs/2508.21421"


class Chain(str, Enum):
    """Where each linear's inputs are measured."""

    MODULE = "module"  # CoM: the merged model so far, inside the layer too
    BLOCK = "block"  # the merged model up to the layer, the expert's own weights inside it
    NONE = "none"  # the expert's own model: RegMean


class Objective(str, Enum):
    """What each linear is fitted to reproduce."""

    REGMEAN = "regmean"
    MATCH_EXPERT = "match_expert"
    BLEND = "blend"  # both targets, mixed by `blend`


class Fallback(str, Enum):
    """The rule for every tensor that is not a linear's weight or bias."""

    AVERAGE = "average"
    TASK_ARITHMETIC = "task_arithmetic"


ACTIVATION_DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTO = "auto"  # alpha / blend: estimated from the calibration data


@dataclass(frozen=True)
class Parameter:
    name: str
    type: Any
    per_model: bool  # set under a model's `parameters:` (else the merge's)
    default: Any
    description: str
    choices: Tuple[str, ...] = ()
    walk_wide: bool = False  # shapes the walk itself: one value for the whole merge


def _choices(enum) -> Tuple[str, ...]:
    return tuple(e.value for e in enum)


PARAMETERS: Dict[str, Parameter] = {p.name: p for p in (
    Parameter("chain", str, False, Chain.MODULE.value,
              "where each linear's inputs come from: `module` (CoM: the merged model so far, "
              "inside the block too), `block` (merged block inputs, expert's own block), "
              "`none` (expert's own model: plain RegMean)", _choices(Chain), walk_wide=True),
    Parameter("objective", str, False, Objective.BLEND.value,
              "`regmean`: fit each expert's weights on its inputs; `match_expert`: fit "
              "what expert t's own layer outputs on its own activations; `blend`: both "
              "targets, mixed by `blend`",
              _choices(Objective), walk_wide=True),
    Parameter("blend", Union[float, str], False, AUTO,
              "under `objective: blend`, the share of the match_expert target in [0, 1] "
              "(0 = regmean, 1 = match_expert), or `auto`: chosen per linear on held-out "
              "calibration sequences"),
    Parameter("alpha", Union[float, str], False, AUTO,
              "off-diagonal keep ratio of each Gram (and cross moment), in [0, 1] "
              "(1 = no shrinkage), or `auto`: estimated per expert and linear from its "
              "calibration data (Ledoit-Wolf)"),
    Parameter("ridge", float, False, 1e-5,
              "ridge added to the summed Gram, relative to its mean diagonal, in [0, 1] "
              "(larger values shrink every merged linear towards zero)"),
    Parameter("num_samples", int, False, 128, "first N records of each calibration file",
              walk_wide=True),
    Parameter("max_seq_len", int, False, 512, "tokens kept per record", walk_wide=True),
    Parameter("batch_size", int, False, 8,
              "sequences of `max_seq_len` tokens per forward pass; shorter records are packed "
              "up to `batch_size` x `max_seq_len` tokens (the value set, even where a model with "
              "fewer positions cuts records shorter)", walk_wide=True),
    Parameter("activation_dtype", str, False, "auto",
              "dtype of the cached activations between layers: `auto` (bfloat16 on "
              "GPU, float32 on CPU), `float32`, `bfloat16`, `float16`; Grams are "
              "always summed in float32 or better", ACTIVATION_DTYPES, walk_wide=True),
    Parameter("activation_budget", float, False, 0.0,
              "GB of activations kept on the compute device before spilling to CPU "
              "memory, then disk; 0 = half the free memory at start", walk_wide=True),
    Parameter("exact_shift", bool, False, False,
              "measure `com_report.json`'s covariate shift on every calibration token (true), "
              "not on a sample of at most 256 tokens per expert (false: the merge then runs "
              "the experts' own models only where `chain` or `objective` needs them)",
              walk_wide=True),
    Parameter("fallback", str, False, Fallback.AVERAGE.value,
              "rule for non-linear tensors (embeddings, norms): `average` or "
              "`task_arithmetic` (needs `base_model`)", _choices(Fallback)),
    Parameter("lambda", float, False, 1.0,
              "scale of the summed task vectors under `fallback: task_arithmetic`"),
    Parameter("calibration", Optional[str], True, None,
              "per model: calibration data: a .jsonl/.json (`text` or `messages` records), "
              ".txt or .parquet file, a `datasets.save_to_disk` folder, a downloaded dataset "
              "repository folder, or a Hub dataset id `org/name`; set under the top-level "
              "`parameters:`, it is every expert's default"),
    Parameter("calibration_split", str, True, "train",
              "per model: the split of a dataset `calibration` to read"),
    Parameter("calibration_config", Optional[str], True, None,
              "per model: the configuration (subset) of a dataset `calibration`"),
    Parameter("calibration_column", Optional[str], True, None,
              "per model: the field holding each record's text, or its chat as a list of "
              "`role`/`content` messages, in place of `text`/`messages`"),
    Parameter("calibration_template", Optional[str], True, None,
              "per model: a format string over each record's fields, e.g. "
              "`\"{question}\\n{answer}\"`, whose result is the record's text"),
    Parameter("weight", float, True, 1.0,
              "per model: weight of this expert in every solve and average"),
)}

WALK_WIDE = tuple(name for name, p in PARAMETERS.items() if p.walk_wide)
_POSITIVE = ("num_samples", "max_seq_len", "batch_size")
_NON_NEGATIVE = ("ridge", "weight", "activation_budget")
# ridge is relative to the Gram's mean diagonal: at 1 it already shrinks the merged
# linears by about half; beyond, the merge is mostly the ridge (ridge: 1e5 zeroes them).
MAX_RIDGE = 1.0
# Bounds that keep a value from overflowing what it sizes or scales (an int of bytes; the
# float32 embeddings and norms, whose task vectors lambda multiplies).
MAX_ACTIVATION_BUDGET = 1e6  # GB
MAX_LAMBDA = 1e3


def relative_weights(weights: Sequence[float]) -> List[float]:
    """Expert weights scaled to a largest of 1. Only their ratios matter to a solve or an
    average, and valid weights far below 1 (1e-46) would underflow the float32 products
    they scale."""
    top = max(weights, default=0.0)
    return [w / top for w in weights] if top > 0 else list(weights)


def check_value(name: str, value: Any, where: str) -> None:
    """Range and choice checks; ``where`` says where the value came from."""

    def bad(rule: str) -> ChainConfigError:
        return ChainConfigError(f"parameter '{name}' = {value!r} {where} {rule}")

    parameter = PARAMETERS[name]
    if isinstance(value, float) and not math.isfinite(value):
        raise bad("must be a finite number")
    if name in ("alpha", "blend") and isinstance(value, bool):  # YAML's true would pass as 1
        raise bad(f"must be a number in [0, 1] or {AUTO}")
    if name in ("alpha", "blend") and isinstance(value, str):
        if value != AUTO:
            raise bad(f"must be a number in [0, 1] or {AUTO}")
    elif name in ("alpha", "blend") and not 0.0 <= value <= 1.0:
        raise bad("must be in [0, 1]")
    if name in _POSITIVE and value <= 0:
        raise bad("must be a positive integer")
    if name in _NON_NEGATIVE and value < 0:
        raise bad("must be >= 0")
    if name == "ridge" and value > MAX_RIDGE:
        raise bad(f"must be at most {MAX_RIDGE:g}: it is relative to each Gram's mean "
                  "diagonal, so larger values shrink every merged linear towards zero "
                  "(the default is 1e-05)")
    if name == "activation_budget" and value > MAX_ACTIVATION_BUDGET:
        raise bad(f"must be at most {MAX_ACTIVATION_BUDGET:g} (GB; 0 means half the free memory)")
    if name == "lambda" and not -MAX_LAMBDA <= value <= MAX_LAMBDA:
        raise bad(f"must be between {-MAX_LAMBDA:g} and {MAX_LAMBDA:g}: it scales the summed task "
                  "vectors of fallback: task_arithmetic (values near 1 are usual)")
    if parameter.choices and value not in parameter.choices:
        raise bad(f"must be one of {', '.join(parameter.choices)}")


@dataclass(frozen=True)
class WalkSettings:
    """The walk-wide values (one for the whole merge)."""

    chain: Chain = Chain.MODULE
    objective: Objective = Objective.BLEND
    batch_size: int = 8
    activation_dtype: str = "auto"
    activation_budget: float = 0.0
    exact_shift: bool = False

    @classmethod
    def from_values(cls, values: Dict[str, Any]) -> "WalkSettings":
        return cls(
            chain=Chain(values["chain"]),
            objective=Objective(values["objective"]),
            batch_size=values["batch_size"],
            activation_dtype=values["activation_dtype"],
            activation_budget=values["activation_budget"],
            exact_shift=values.get("exact_shift", False),
        )


@dataclass(frozen=True)
class SolveSettings:
    """What one linear's solve uses, as resolved for its weight tensor (filters, slices)."""

    alpha: Union[float, str]  # a number, or "auto"
    ridge: float
    weights: Tuple[float, ...]  # one per expert, in the walk's expert order
    blend: Union[float, str] = AUTO  # objective: blend only; a number, or "auto"
