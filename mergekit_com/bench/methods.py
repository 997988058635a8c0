"""The merge methods the benchmark compares, as mergekit YAML configs, and the
knob each one has tuned on the validation split.

mergekit's task-arithmetic family (task_arithmetic, ties, dare_ties) scales the
merged task vector by its `lambda` parameter; ours scales the task vectors of
the non-linear tensors the same way (`fallback: task_arithmetic`, `lambda`)
and, for the regmean objective, also has the shrinkage `alpha`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from ..zoo.build import ZooManifest

# Shared by mergekit's task-arithmetic family: ties normalises by the summed weights
# (optimum near K x the average), task_arithmetic and dare_ties do not (optimum < 1).
MERGEKIT_LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
AVERAGE = "1/K"  # in a grid: lambda = 1 / (number of experts), the plain average of their task vectors
OUR_LAMBDAS = (AVERAGE, 0.5, 1.0)
OUR_ALPHAS = (0.5, 0.9, 1.0)
DENSITY = 0.5  # ties / dare_ties: keep half of each task vector (mergekit's examples)
SEED = 0  # dare_ties drops at random: seeded through --random-seed

Knobs = Dict[str, float]


@dataclass(frozen=True)
class Method:
    name: str  # row label
    merge_method: str
    params: Dict[str, object] = field(default_factory=dict)  # fixed global parameters
    grid: Dict[str, Tuple[float, ...]] = field(default_factory=dict)  # tuned on val
    ours: bool = False

    def knob_settings(self) -> List[Knobs]:
        names = list(self.grid)
        return [dict(zip(names, vals)) for vals in itertools.product(*self.grid.values())] or [{}]

    def config(self, zoo: ZooManifest, knobs: Knobs, calib: Dict[str, str] | None = None,
               extra: Dict[str, object] | None = None) -> dict:
        """The mergekit YAML (as a dict) merging every expert of the zoo."""
        models = []
        for task, path in zoo.experts.items():
            p: Dict[str, object] = {"weight": 1.0}
            if self.merge_method in ("ties", "dare_ties"):
                p["density"] = DENSITY
            if self.ours:
                p["calibration"] = str((calib or {}).get(task, zoo.data_file(task, "calib")))
            models.append({"model": str(path), "parameters": p})
        cfg = {"merge_method": self.merge_method, "models": models, "dtype": "float32"}
        if self.merge_method != "linear":
            cfg["base_model"] = str(zoo.base)
        params = {**self.params, **knobs, **(extra or {})}
        if params:
            cfg["parameters"] = params
        return cfg


# Smaller grids where every merge and score costs minutes (name -> (mergekit lambdas,
# our lambdas, our alphas)). smollm2 keeps alpha at 1, the best value of tiny's ablation.
GRIDS = {
    "full": (MERGEKIT_LAMBDAS, OUR_LAMBDAS, OUR_ALPHAS),
    "smollm2": ((0.5, 1.0, 2.0), (AVERAGE, 1.0), (0.9, 1.0)),
    "quick": ((0.5, 1.0), (0.5,), (0.9,)),
}
DEFAULTS_ROW = "CoM (all defaults)"
TUNED_COM_ROW = "CoM (chain: module)"


def grid_for(preset: str) -> str:
    """The tuning/ablation grid a zoo preset uses."""
    return preset if preset in GRIDS else "full"


def methods(grid: str = "full", experts: int = 5) -> List[Method]:
    """Every row of the benchmark, with the tuning grid of ``GRIDS[grid]`` for ``experts``
    experts (``AVERAGE`` is ``1 / experts``)."""
    lam_mk, lam_ours, alphas = GRIDS[grid]
    lam_ours = tuple(sorted({round(1.0 / experts, 3) if lam == AVERAGE else lam for lam in lam_ours}))
    # the three chains with the regmean objective, as their papers define them
    ours = {"fallback": "task_arithmetic", "objective": "regmean"}
    return [
        Method("linear", "linear", {"normalize": True}),
        Method("task_arithmetic", "task_arithmetic", grid={"lambda": lam_mk}),
        Method("ties", "ties", grid={"lambda": lam_mk}),
        Method("dare_ties", "dare_ties", grid={"lambda": lam_mk}),
        Method("RegMean (chain: none)", "chain_of_merges", {**ours, "chain": "none"},
               {"alpha": alphas, "lambda": lam_ours}, ours=True),
        Method("RegMean++ (chain: block)", "chain_of_merges", {**ours, "chain": "block"},
               {"alpha": alphas, "lambda": lam_ours}, ours=True),
        Method("CoM (chain: module)", "chain_of_merges", {**ours, "chain": "module"},
               {"alpha": alphas, "lambda": lam_ours}, ours=True),
        # alpha is not used by match_expert: only the scale is tuned
        Method("CoM + match_expert", "chain_of_merges",
               {**ours, "chain": "module", "objective": "match_expert"}, {"lambda": lam_ours}, ours=True),
        # what a user gets: every parameter at its default (objective blend, alpha auto, ...)
        defaults_method(),
    ]


def defaults_method() -> Method:
    """chain_of_merges with nothing but each expert's calibration: what a user gets."""
    return Method(DEFAULTS_ROW, "chain_of_merges", ours=True)


def candidates(grid: str = "full") -> List[Tuple[str, Method, Knobs]]:
    """Fixed configurations for the investigation (``bench candidates``): no tuning,
    each merged once and scored on val and eval. Names are what the tables show."""
    com = {"chain": "module"}
    ta = {"fallback": "task_arithmetic", "lambda": 1.0}

    def ours(name: str, **params) -> Tuple[str, Method, Knobs]:
        return name, Method(name, "chain_of_merges", {**com, **params}, ours=True), {}

    layer0 = [{"filter": "layers.0.", "value": 1.0}, {"value": 0.0}]
    return [
        ours("defaults"),
        # (objective named: the default is blend since these rows were first measured)
        ours("regmean a=0.9", objective="regmean", alpha=0.9),
        ours("regmean a=1", objective="regmean", alpha=1.0),
        ours("regmean auto", objective="regmean", alpha="auto"),
        ours("regmean a=1 ta", objective="regmean", alpha=1.0, **ta),
        ours("match_expert", objective="match_expert"),
        ours("blend 1 a=0.9", objective="blend", blend=1.0, alpha=0.9),
        ours("blend 1 auto", objective="blend", blend=1.0, alpha="auto"),
        ours("match_expert ta", objective="match_expert", **ta),
        ours("blend 0.25 a=1", objective="blend", blend=0.25, alpha=1.0),
        ours("blend 0.5 a=1", objective="blend", blend=0.5, alpha=1.0),
        ours("blend 0.75 a=1", objective="blend", blend=0.75, alpha=1.0),
        ours("blend 0.5 auto", objective="blend", blend=0.5, alpha="auto"),
        # the share chosen per linear on held-out calibration sequences
        ours("blend auto a=1", objective="blend", blend="auto", alpha=1.0),
        ours("blend auto auto", objective="blend", blend="auto", alpha="auto"),
        # the embeddings hypothesis: correct the drift of the averaged embeddings only
        ours("match layer 0 only a=1", objective="blend", blend=layer0, alpha=1.0),
        ours("RegMean auto", chain="none", objective="regmean", alpha="auto"),
    ]


def describe(knobs: Knobs) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in knobs.items()) or "-"


ABLATIONS = {
    "full": ((0.5, 0.75, 0.9, 0.99, 1.0), (16, 32, 64, 128)),
    "smollm2": ((0.9, 1.0), (16, 64)),
    "quick": ((0.9, 1.0), (4, 8)),
}
# calibration records per expert for ``bench budget`` (the zoo must hold that many)
BUDGETS = {
    "full": (2, 4, 8, 16, 32, 64, 128, 256),
    "smollm2": (4, 8, 16, 32, 64, 128, 256),
    "quick": (2, 8),
}


def budget_grid(grid: str = "full") -> Sequence[int]:
    return BUDGETS[grid]


def ablation_grid(grid: str = "full") -> Tuple[Sequence[float], Sequence[int]]:
    """(alphas, num_samples) for CoM's sensitivity table."""
    return ABLATIONS[grid]
