"""Do the defaults win? One row per zoo, from the benchmark's own JSON.

For each zoo: the all-defaults merge (eval split), the best variant of ours on
eval (every fixed candidate of ``bench candidates`` and every tuned row of ours
in ``bench quality``), and the best tuned mergekit baseline. The defaults
"match the best" when within 1 point of it or inside its 95% interval, and
"beat a baseline" only when the two intervals do not overlap (else: no
measurable difference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..method.parameters import PARAMETERS
from .methods import DEFAULTS_ROW

Row = Tuple[str, float, Sequence[float]]  # name, normalized accuracy, 95% CI


def is_default(params: dict, run_defaults: Optional[dict]) -> bool:
    """Whether a candidate ran with today's defaults. ``run_defaults``: the defaults in
    effect when it ran (the result's header); results without it never count."""
    if run_defaults is None:
        return False
    effective = {**run_defaults, **params}
    return all(name in PARAMETERS and PARAMETERS[name].default == value
               for name, value in effective.items())


def _zoo_key(result: dict) -> str:
    seed = result.get("seed") or 0
    return result["preset"] + (f" (seed {seed})" if seed else "")


def collect(paths: Sequence[Path]) -> Dict[str, dict]:
    """zoo -> {"ours": [Row], "defaults": Row | None, "mergekit": [Row]}."""
    zoos: Dict[str, dict] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        zoo = zoos.setdefault(_zoo_key(result), {"ours": [], "defaults": None, "mergekit": []})
        for row in result.get("candidates", []):
            ev = row["eval"]
            entry = (row["name"], ev["normalized_accuracy"], ev["normalized_ci"])
            zoo["ours"].append(entry)
            if zoo["defaults"] is None and is_default(row["params"], result.get("defaults")):
                zoo["defaults"] = entry
        for row in result.get("methods", []):
            entry = (row["method"], row["normalized_accuracy"], row["normalized_ci"])
            if row["merge_method"] != "chain_of_merges":
                zoo["mergekit"].append(entry)
                continue
            zoo["ours"].append(entry)
            if row["method"] == DEFAULTS_ROW and result.get("defaults") is not None:
                zoo["defaults"] = entry
    return zoos


def _fmt(row: Optional[Row]) -> str:
    if row is None:
        return "-"
    name, acc, ci = row
    return f"{100 * acc:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({name})"


def judge(zoo: dict) -> Tuple[str, str]:
    """(does the default match our best?, does it beat every mergekit baseline?)"""
    d = zoo["defaults"]
    if d is None:
        return "no defaults row", "-"
    best = max(zoo["ours"], key=lambda r: r[1])
    gap = best[1] - d[1]
    inside = best[2][0] <= d[1] <= best[2][1]
    match = ("yes" if gap <= 0.01 or inside else "no") + f" ({100 * gap:+.1f} pts to the best)"
    if not zoo["mergekit"]:
        return match, "no baseline run"
    top = max(zoo["mergekit"], key=lambda r: r[1])
    if d[2][0] > top[2][1]:
        beat = "yes (intervals apart)"
    elif d[2][1] < top[2][0]:
        beat = "no (baseline better)"
    else:
        beat = "no measurable difference"
    return match, beat


def table(zoos: Dict[str, dict]) -> str:
    lines = ["| zoo | defaults | best of ours | best mergekit baseline | defaults match ours | "
             "defaults above mergekit |", "|---|---|---|---|---|---|"]
    for key in sorted(zoos):
        zoo = zoos[key]
        best = max(zoo["ours"], key=lambda r: r[1]) if zoo["ours"] else None
        top = max(zoo["mergekit"], key=lambda r: r[1]) if zoo["mergekit"] else None
        match, beat = judge(zoo)
        lines.append(f"| {key} | {_fmt(zoo['defaults'])} | {_fmt(best)} | {_fmt(top)} | {match} | {beat} |")
    return "\n".join(lines)


def main(paths: List[str]) -> None:
    print(table(collect([Path(p) for p in paths])))
