"""The quality benchmark: every method merges the zoo's experts through
``mergekit-yaml``; each knob is tuned on the val split, the chosen merge is
scored on the eval split; then a small alpha x num_samples ablation of CoM.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..evaluate import evaluate_model, normalized_accuracy
from ..zoo import build_zoo
from ..zoo.build import ZooManifest
from .measure import run_yaml
from .methods import SEED, Method, ablation_grid, describe, grid_for, methods

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


class QualityBench:
    def __init__(self, zoo: ZooManifest, work: Path, threads: int = 1, device: str = "cpu",
                 extra: Optional[dict] = None):
        self.zoo, self.work, self.device = zoo, Path(work), device
        self.grid = grid_for(zoo.preset)
        self.args = _merge_args(threads, device)
        self.extra = extra or {}  # extra parameters for our methods (tests: fewer samples)
        self.experts_val = _own_accuracy(zoo, "val")
        self.experts_eval = _own_accuracy(zoo, "eval")

    def _merge(self, method: Method, knobs: dict, tag: str, extra: Optional[dict] = None):
        out = self.work / "merges" / _slug(f"{method.name}_{tag}")
        if out.exists():
            shutil.rmtree(out)
        cfg = method.config(self.zoo, knobs, extra={**self.extra, **(extra or {})} if method.ours else None)
        return out, run_yaml(cfg, out, self.args)

    def _score(self, path: Path, split: str) -> dict:
        return evaluate_model(path, self.zoo.data_dir, self.zoo.tasks, split, self.device)

    def tune_and_evaluate(self, method: Method) -> dict:
        """Pick the knob setting with the best val normalized accuracy; score it on eval."""
        trials, best = [], None
        settings = method.knob_settings()
        for knobs in settings:
            out, measured = self._merge(method, knobs, describe(knobs))
            val = None
            if len(settings) > 1:
                val = normalized_accuracy(self._score(out, "val"), self.experts_val)
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
            "normalized_accuracy": normalized_accuracy(scores, self.experts_eval),
            "measure": measured.to_json(),
            "path": str(out),
        }

    def ablation(self, com: Method, knobs: dict) -> List[dict]:
        """CoM's eval normalized accuracy over alpha x num_samples, other knobs as tuned."""
        alphas, counts = ablation_grid(self.grid)
        rows = []
        for n in counts:
            for a in alphas:
                settings = {**knobs, "alpha": a}
                out, measured = self._merge(com, settings, f"ablation_a{a:g}_n{n}", {"num_samples": n})
                acc = normalized_accuracy(self._score(out, "eval"), self.experts_eval)
                LOG.info("  ablation alpha=%g num_samples=%d: %.1f%%", a, n, 100 * acc)
                rows.append({"alpha": a, "num_samples": n, "normalized_accuracy": acc,
                             "merge_s": measured.merge_s})
                shutil.rmtree(out)
        return rows


def run(preset: str, zoo_dir: Path, out_dir: Path, threads: int = 1, device: str = "cpu",
        only: Optional[List[str]] = None, ablation: bool = True,
        extra: Optional[dict] = None) -> dict:
    start = time.perf_counter()
    zoo = build_zoo(preset, zoo_dir, threads=threads)
    bench = QualityBench(zoo, out_dir, threads, device, extra)
    rows, rows_of = [], methods(bench.grid)
    for method in rows_of:
        if only and method.name not in only and method.merge_method not in only:
            continue
        LOG.info("%s", method.name)
        rows.append(bench.tune_and_evaluate(method))
    com = next(m for m in rows_of if m.name.startswith("CoM ("))
    com_row = next((r for r in rows if r["method"] == com.name), None)
    abl = bench.ablation(com, {k: v for k, v in com_row["tuned"].items() if k != "alpha"}) \
        if ablation and com_row else []
    refs = {name: zoo.results["eval"][name] for name in ["base", *[f"expert_{t}" for t in zoo.tasks], "multitask"]}
    return {
        "preset": zoo.preset,
        "zoo": str(zoo.root),
        "tasks": zoo.tasks,
        "device": device,
        "threads": threads,
        "experts_eval": bench.experts_eval,
        "references": {
            name: {"eval": res, "normalized_accuracy": normalized_accuracy(res, bench.experts_eval)}
            for name, res in refs.items()
        },
        "methods": rows,
        "ablation": abl,
        "seconds": time.perf_counter() - start,
    }
