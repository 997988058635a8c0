"""Reference merges of a zoo's experts with stock mergekit (sanity check of the testbed).

A fair zoo must let plain task arithmetic of the experts clearly beat the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import yaml

from .build import ZooManifest


def merge_config(manifest: ZooManifest, method: str = "task_arithmetic", weight: float = 1.0) -> dict:
    """A mergekit YAML config (as a dict) merging all experts of the zoo."""
    models = [{"model": str(p), "parameters": {"weight": weight}} for p in manifest.experts.values()]
    cfg = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = str(manifest.base)
    return cfg


def run_baseline(manifest: ZooManifest, method: str = "task_arithmetic", weight: float = 1.0,
                 out_dir: Optional[Path] = None) -> Path:
    """Merge the experts with mergekit into out_dir (default <zoo>/merges/<method>_w<weight>)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = Path(out_dir or manifest.root / "merges" / f"{method}_w{weight:g}")
    cfg = merge_config(manifest, method, weight)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True),
              config_source=yaml.safe_dump(cfg))
    return out


def check_merges(manifest: ZooManifest, weights: Sequence[float] = (0.5, 1.0),
                 splits: Sequence[str] = ("val", "eval"), save: bool = True) -> Dict[str, dict]:
    """Score task arithmetic (at each weight) and the plain average of the experts.

    Results go to manifest.baselines[split][name] (and zoo.json when save=True).
    """
    from ..evaluate import evaluate_model

    runs = {f"task_arithmetic_w{w:g}": ("task_arithmetic", w) for w in weights}
    runs["linear_avg"] = ("linear", 1.0)
    for name, (method, w) in runs.items():
        path = run_baseline(manifest, method, w)
        for split in splits:
            manifest.baselines.setdefault(split, {})[name] = evaluate_model(
                path, manifest.data_dir, manifest.tasks, split)
    if save:
        manifest.save()
    return manifest.baselines
