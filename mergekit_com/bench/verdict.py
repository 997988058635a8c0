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
import math
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
    tasks = f" [{','.join(result['tasks'])}]" if result.get("custom_tasks") else ""
    return result["preset"] + (f" (seed {seed})" if seed else "") + tasks


def is_quality_result(result) -> bool:
    """Whether a JSON file is what ``bench quality`` or ``bench candidates`` writes (the
    other benchmarks share their output folder: ``bench_out/*.json`` names theirs too)."""
    return isinstance(result, dict) and "preset" in result and (
        "candidates" in result or "methods" in result)


def read_results(paths: Sequence[Path]) -> Tuple[List[dict], List[Path]]:
    """The quality/candidates results among ``paths``, and the files that are not."""
    results, skipped = [], []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"bench verdict: {path} could not be read as JSON ({e})") from None
        if is_quality_result(result):
            results.append(result)
        else:
            skipped.append(Path(path))
    return results, skipped


def collect(paths: Sequence[Path]) -> Dict[str, dict]:
    """zoo -> {"ours": [Row], "defaults": Row | None, "mergekit": [Row]}."""
    return collect_results(read_results(paths)[0])


def collect_results(results: Sequence[dict]) -> Dict[str, dict]:
    zoos: Dict[str, dict] = {}
    for result in results:
        zoo = zoos.setdefault(_zoo_key(result), {"ours": [], "defaults": None, "mergekit": [],
                                                  "weak": {}})
        zoo["weak"].update(result.get("weak_experts") or {})
        for row in result.get("candidates", []):
            ev = row["eval"]
            entry = (row["name"], ev["normalized_accuracy"], ev["normalized_ci"])
            today = is_default(row["params"], result.get("defaults"))
            if row["name"] == "defaults" and not today:
                continue  # the defaults of an earlier version: its named twin row stays
            zoo["ours"].append(entry)
            if zoo["defaults"] is None and today:
                zoo["defaults"] = entry
        for row in result.get("methods", []):
            entry = (row["method"], row["normalized_accuracy"], row["normalized_ci"])
            if row["merge_method"] != "chain_of_merges":
                zoo["mergekit"].append(entry)
                continue
            zoo["ours"].append(entry)
            if row["method"] == DEFAULTS_ROW and is_default({}, result.get("defaults")):
                zoo["defaults"] = entry
    return zoos


def _score(row: Row) -> str:
    _, acc, ci = row
    return f"{100 * acc:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _fmt(row: Optional[Row]) -> str:
    return "-" if row is None else f"{_score(row)} ({row[0]})"


UNDEFINED = ("undefined (a normalized accuracy or its interval is NaN: no expert scored above "
             "0 on its own task, so there is nothing to normalize by)")


def _finite(row: Row) -> bool:
    return all(math.isfinite(v) for v in (row[1], *row[2]))


def judge(zoo: dict) -> Tuple[str, str]:
    """(does the default match our best?, does it beat every mergekit baseline?)"""
    d = zoo["defaults"]
    if d is None:
        return "no defaults row", "-"
    # NaN compares false: it would read "no" and "no measurable difference". Every row of a
    # zoo is normalized by the same experts, so one NaN row means all are
    if not _finite(d):
        return UNDEFINED, UNDEFINED
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


def weak_notes(zoos: Dict[str, dict]) -> List[str]:
    """A line per zoo whose experts did not all learn their task: its verdict rests on
    their noise (each normalizes by a few lucky prompts), not only on the method."""
    notes = []
    for key in sorted(zoos):
        weak = zoos[key].get("weak") or {}
        if weak:
            named = ", ".join(f"expert_{t} {100 * e:.1f}% (base {100 * b:.1f}%)"
                              for t, (e, b) in sorted(weak.items()))
            notes.append(f"note: {key}: these experts did not learn their task (val accuracy): "
                         f"{named}; their tasks widen every interval and can decide the verdict: "
                         "rebuild the zoo without them (--tasks) before reading it")
    return notes


def matrix(zoos: Dict[str, dict]) -> str:
    """Every variant of ours (rows) on every zoo (columns): eval normalized [95% CI]."""
    keys = sorted(zoos)
    names: List[str] = []
    for key in keys:
        names += [r[0] for r in zoos[key]["ours"] if r[0] not in names]
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in names:
        cells = []
        for key in keys:
            row = next((r for r in zoos[key]["ours"] if r[0] == name), None)
            cells.append(_score(row) if row else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths: List[str]) -> None:
    results, skipped = read_results([Path(p) for p in paths])
    for path in skipped:
        print(f"(skipped {path}: not a bench quality or candidates result)")
    if not results:
        raise SystemExit("bench verdict: none of the files given is a bench quality or candidates "
                         "result (bench_out/quality.json, bench_out/candidates.json, ...)")
    zoos = collect_results(results)
    print(table(zoos))
    for note in weak_notes(zoos):
        print(note)
    print("\nEvery variant of ours, normalized accuracy % on eval [95% CI]:\n")
    print(matrix(zoos))
