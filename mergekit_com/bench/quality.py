"""The quality benchmark: every method merges the zoo's experts through
``mergekit-yaml``; each knob is tuned on the val split, the chosen merge is
scored on the eval split; then a small alpha x num_samples ablation of CoM.

Every normalized accuracy on eval comes with a 95% bootstrap interval (the
prompts of each task resampled, paired with the experts' own results on them;
``evaluate.normalized_accuracy_ci``).

Two more modes: ``candidates`` merges fixed configurations (no tuning) and scores
each on val and eval, and ``budget`` measures the default merge against the number
of calibration tokens per expert.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..evaluate import evaluate_model, normalized_accuracy, normalized_accuracy_ci
from ..zoo import build_zoo
from ..method.parameters import PARAMETERS
from ..zoo.build import ZooManifest, describe_weak_experts, weak_experts
from ..zoo.presets import get_preset
from .measure import run_yaml
from .methods import (SEED, TUNED_COM_ROW, Method, ablation_grid, budget_grid, candidates,
                      defaults_method, describe, grid_for, methods)

LOG = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.=]+", "_", text.lower()).strip("_")


def _merge_args(threads: int, device: str) -> List[str]:
    args = ["--quiet", "--random-seed", str(SEED), "--num-threads", str(threads)]
    if device.startswith("cuda"):
        args += ["--cuda", "--device", device]
    return args


def _own_accuracy(zoo: ZooManifest, split: str) -> Dict[str, float]:
    return {t: zoo.results[split][f"expert_{t}"][t]["accuracy"] for t in zoo.tasks}


def _own_scores(zoo: ZooManifest, split: str) -> Dict[str, dict]:
    """Each expert's score on its own task (with the per-prompt ``correct`` flags)."""
    return {t: zoo.results[split][f"expert_{t}"][t] for t in zoo.tasks}


def _head_accuracy(score: dict, n: int) -> float:
    """Accuracy on the first ``n`` prompts, from the per-prompt ``correct`` flags."""
    flags = score["correct"][:n]
    return flags.count("1") / len(flags)


def task_intervals(scores: Dict[str, dict], experts: Dict[str, dict]) -> Dict[str, List[float]]:
    """Per task: the 95% bootstrap interval of merged accuracy / the expert's."""
    return {t: normalized_accuracy_ci({t: scores[t]}, {t: experts[t]}) for t in experts}


def summarize_scores(scores: Dict[str, dict], experts: Dict[str, dict]) -> dict:
    """Normalized accuracy with its interval, per task too, from one split's scores."""
    return {
        "normalized_accuracy": normalized_accuracy(scores, experts),
        "normalized_ci": normalized_accuracy_ci(scores, experts),
        "task_ci": task_intervals(scores, experts),
    }


class QualityBench:
    def __init__(self, zoo: ZooManifest, work: Path, threads: int = 1, device: str = "cpu",
                 extra: Optional[dict] = None, backend: str = "own", tune_limit: Optional[int] = None):
        self.zoo, self.work, self.device = zoo, Path(work), device
        # tune on the first N val prompts per task (None: all), against the experts' score on them
        self.tune_limit = tune_limit
        # how merges are scored (evaluate_model's backend); the experts' and references'
        # scores come from the zoo manifest, scored by our own loop (the two agree per prompt)
        self.backend = backend
        self.grid = grid_for(zoo.preset)
        self.args = _merge_args(threads, device)
        self.extra = extra or {}  # extra parameters for our methods (tests: fewer samples)
        self.experts_val = _own_accuracy(zoo, "val")
        self.experts_eval = _own_accuracy(zoo, "eval")
        self.expert_scores = {"val": _own_scores(zoo, "val"), "eval": _own_scores(zoo, "eval")}

    def _merge(self, method: Method, knobs: dict, tag: str, extra: Optional[dict] = None):
        out = self.work / "merges" / _slug(f"{method.name}_{tag}")
        if out.exists():
            shutil.rmtree(out)
        cfg = method.config(self.zoo, knobs, extra={**self.extra, **(extra or {})} if method.ours else None)
        return out, run_yaml(cfg, out, self.args)

    def _experts_tune(self) -> Dict[str, float]:
        """The experts' val accuracy on the prompts the tuning scores."""
        if self.tune_limit is None:
            return self.experts_val
        return {t: _head_accuracy(s, self.tune_limit) for t, s in self.expert_scores["val"].items()}

    def _score(self, path: Path, split: str, limit: Optional[int] = None) -> dict:
        return evaluate_model(path, self.zoo.data_dir, self.zoo.tasks, split, self.device,
                              limit=limit, backend=self.backend)

    def tune_and_evaluate(self, method: Method) -> dict:
        """Pick the knob setting with the best val normalized accuracy; score it on eval.

        A method without knobs (e.g. the defaults) is merged once and scored on eval only.
        """
        trials, best = [], None
        settings = method.knob_settings()
        for knobs in settings:
            out, measured = self._merge(method, knobs, describe(knobs))
            val = None
            if len(settings) > 1:
                val = normalized_accuracy(self._score(out, "val", self.tune_limit), self._experts_tune())
                trials.append({"knobs": knobs, "val_normalized": val})
                LOG.info("  %-26s %-22s val normalized %.1f%%", method.name, describe(knobs), 100 * val)
            if best is None or val > best[0]:
                if best is not None:
                    shutil.rmtree(best[2])
                best = (val, knobs, out, measured)
            else:
                shutil.rmtree(out)
        _, knobs, out, measured = best
        scores = self._score(out, "eval")
        return {
            "method": method.name,
            "merge_method": method.merge_method,
            "fixed": dict(method.params),
            "tuned": knobs,
            "trials": trials,
            "eval": scores,
            "mean_accuracy": sum(s["accuracy"] for s in scores.values()) / len(scores),
            **summarize_scores(scores, self.expert_scores["eval"]),
            "measure": measured.to_json(),
            "path": str(out),
        }

    def fixed(self, name: str, method: Method, knobs: dict, extra: Optional[dict] = None,
              splits=("val", "eval"), keep: bool = False) -> dict:
        """One configuration, no tuning: merged once, scored on each split."""
        out, measured = self._merge(method, knobs, describe({**knobs, **(extra or {})}) or "fixed", extra)
        row = {"name": name, "method": method.name, "params": {**method.params, **knobs, **(extra or {})},
               "measure": measured.to_json(), "tokens_per_expert": _tokens_per_expert(out)}
        for split in splits:
            scores = self._score(out, split)
            row[split] = {"scores": scores, **summarize_scores(scores, self.expert_scores[split])}
        LOG.info("  %-40s %s", name, "  ".join(
            f"{s} {100 * row[s]['normalized_accuracy']:.1f} [{100 * row[s]['normalized_ci'][0]:.1f}, "
            f"{100 * row[s]['normalized_ci'][1]:.1f}]" for s in splits))
        if keep:
            row["path"] = str(out)
        else:
            shutil.rmtree(out)
        return row

    def ablation(self, com: Method, knobs: dict) -> List[dict]:
        """CoM's eval normalized accuracy over alpha x num_samples, other knobs as tuned."""
        alphas, counts = ablation_grid(self.grid)
        rows = []
        for n in counts:
            for a in alphas:
                settings = {**knobs, "alpha": a}
                out, measured = self._merge(com, settings, f"ablation_a{a:g}_n{n}", {"num_samples": n})
                scores = self._score(out, "eval")
                acc = normalized_accuracy(scores, self.experts_eval)
                LOG.info("  ablation alpha=%s num_samples=%d: %.1f%%", a, n, 100 * acc)
                rows.append({"alpha": a, "num_samples": n, "normalized_accuracy": acc,
                             "normalized_ci": normalized_accuracy_ci(scores, self.expert_scores["eval"]),
                             "tokens_per_expert": _tokens_per_expert(out), "merge_s": measured.merge_s})
                shutil.rmtree(out)
        return rows


def _tokens_per_expert(path: Path) -> Optional[List[int]]:
    """Calibration tokens of each expert, from the com_report.json of one of our merges."""
    report = Path(path) / "com_report.json"
    if not report.exists():
        return None
    import json

    return [e["calibration"]["tokens"] for e in json.loads(report.read_text())["experts"]]


class ZooMismatch(ValueError):
    """``--zoo`` holds another zoo than the one asked for."""


def _zoo(preset: str, zoo_dir: Path, threads: int, seed: int, overrides: Optional[dict] = None) -> ZooManifest:
    """The zoo in ``zoo_dir``, built there if absent. One built there already (say with
    ``python -m mergekit_com.zoo --tasks ...``) is taken with its own tasks; one built for
    another preset, seed or task list stops the benchmark (``ZooMismatch``) rather than
    being rebuilt over."""
    overrides = dict(overrides or {})
    # absolute: mergekit's model card asks the Hub about a relative "dir/model" path
    # (mergekit.card.is_hf), which fails offline for a --zoo one folder deep
    zoo_dir = Path(zoo_dir).resolve()
    try:
        built = json.loads((zoo_dir / "zoo.json").read_text())
    except (OSError, ValueError):
        built = None  # none yet, or unreadable: build_zoo decides
    if isinstance(built, dict) and built.get("tasks"):
        tasks = tuple(built["tasks"])
        built_seed = built.get("settings", {}).get("seed", 0)
        asked = tuple(overrides.get("tasks") or tasks)
        if built.get("preset") != preset or built_seed != seed or asked != tasks:
            raise ZooMismatch(
                f"{zoo_dir} holds the {built.get('preset')!r} zoo of seed {built_seed} with tasks "
                f"{','.join(tasks)}, not --preset {preset} --seed {seed} --tasks {','.join(asked)}: "
                f"pass those, or another --zoo (the benchmark does not build over another zoo)")
        overrides["tasks"] = tasks
    zoo = build_zoo(preset, zoo_dir, threads=threads, seed=seed, **overrides)
    warning = describe_weak_experts(zoo)
    if warning is not None:
        LOG.warning("%s", warning)
    return zoo


def _header(zoo: ZooManifest, bench: QualityBench, device: str, threads: int) -> dict:
    # reference rows: the zoo's models scored on every task (a manifest may hold only each
    # expert's own task, which is all the normalisation needs)
    names = ["base", *[f"expert_{t}" for t in zoo.tasks], "multitask"]
    refs = {name: zoo.results["eval"][name] for name in names
            if set(zoo.results["eval"].get(name, {})) >= set(zoo.tasks)}
    return {
        "preset": zoo.preset,
        "seed": zoo.settings.get("seed", 0),
        "zoo": str(zoo.root),
        "tasks": zoo.tasks,
        # built with --tasks: another zoo than the preset's, kept apart by `bench verdict`
        "custom_tasks": tuple(zoo.tasks) != tuple(get_preset(zoo.preset).tasks),
        # experts that did not learn their task (val): {task: [expert, base accuracy]}
        "weak_experts": {t: list(v) for t, v in weak_experts(zoo).items()},
        "device": device,
        "threads": threads,
        "backend": bench.backend,
        "experts_eval": bench.experts_eval,
        # the merge-wide defaults in effect: what a row that sets nothing ran with
        "defaults": {p.name: p.default for p in PARAMETERS.values() if not p.per_model},
        "references": {
            name: {"eval": res, **summarize_scores(res, bench.expert_scores["eval"])}
            for name, res in refs.items()
        },
    }


def run(preset: str, zoo_dir: Path, out_dir: Path, threads: int = 1, device: str = "cpu",
        only: Optional[List[str]] = None, ablation: bool = True,
        extra: Optional[dict] = None, seed: int = 0, zoo_overrides: Optional[dict] = None,
        backend: str = "own", tune_limit: Optional[int] = None) -> dict:
    start = time.perf_counter()
    zoo = _zoo(preset, zoo_dir, threads, seed, zoo_overrides)
    bench = QualityBench(zoo, out_dir, threads, device, extra, backend, tune_limit)
    rows, rows_of = [], methods(bench.grid, len(bench.zoo.tasks))
    for method in rows_of:
        if only and method.name not in only and method.merge_method not in only:
            continue
        LOG.info("%s", method.name)
        rows.append(bench.tune_and_evaluate(method))
    com = next(m for m in rows_of if m.name == TUNED_COM_ROW)
    com_row = next((r for r in rows if r["method"] == com.name), None)
    abl = bench.ablation(com, {k: v for k, v in com_row["tuned"].items() if k != "alpha"}) \
        if ablation and com_row else []
    return {
        **_header(zoo, bench, device, threads),
        "methods": rows,
        "ablation": abl,
        "tune_limit": tune_limit,
        "seconds": time.perf_counter() - start,
    }


def run_candidates(preset: str, zoo_dir: Path, out_dir: Path, threads: int = 1, device: str = "cpu",
                   only: Optional[List[str]] = None, extra: Optional[dict] = None, seed: int = 0,
                   zoo_overrides: Optional[dict] = None, backend: str = "own") -> dict:
    """Every candidate configuration (``methods.candidates``), merged once, scored on val and eval."""
    start = time.perf_counter()
    zoo = _zoo(preset, zoo_dir, threads, seed, zoo_overrides)
    bench = QualityBench(zoo, out_dir, threads, device, extra, backend)
    listed = {c[0]: c for c in candidates(bench.grid)}
    unknown = [n for n in only or [] if n not in listed]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(listed)}")
    header, rows = _header(zoo, bench, device, threads), []
    partial_path = Path(out_dir) / "candidates.partial.json"
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    for name in only or list(listed):  # in the order asked for: the first answers come first
        name, method, knobs = listed[name]
        rows.append(bench.fixed(name, method, knobs))
        # what is done survives an interrupted run (a SmolLM2 candidate costs ~15 min)
        partial = {**header, "candidates": rows, "complete": False,
                   "seconds": time.perf_counter() - start}
        partial_path.write_text(json.dumps(partial))
    partial_path.unlink(missing_ok=True)
    return {**header, "candidates": rows,
            "seconds": time.perf_counter() - start}


def run_budget(preset: str, zoo_dir: Path, out_dir: Path, threads: int = 1, device: str = "cpu",
               counts: Optional[List[int]] = None, extra: Optional[dict] = None, seed: int = 0,
               variants: Optional[List[str]] = None, zoo_overrides: Optional[dict] = None,
               backend: str = "own") -> dict:
    """The default merge (and the given candidates) at growing calibration budgets, on eval."""
    start = time.perf_counter()
    zoo = _zoo(preset, zoo_dir, threads, seed, zoo_overrides)
    bench = QualityBench(zoo, out_dir, threads, device, extra, backend)
    picked = [("defaults", defaults_method(), {})]
    picked += [c for c in candidates(bench.grid) if variants and c[0] in variants]
    rows = []
    for n in counts or budget_grid(bench.grid):
        for name, method, knobs in picked:
            row = bench.fixed(f"{name} n={n}", method, knobs, {"num_samples": n}, splits=("eval",))
            row.update(variant=name, num_samples=n)
            rows.append(row)
    return {**_header(zoo, bench, device, threads), "budget": rows,
            "seconds": time.perf_counter() - start}
