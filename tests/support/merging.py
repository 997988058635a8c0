"""Running merges from tests and reading what they wrote."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file

import mergekit_com  # noqa: F401  (registers the method)


# The settings most tests are written for: the regmean closed form with a fixed shrinkage,
# which the reference solutions recompute. The real defaults (objective blend, blend auto,
# alpha auto) have their own closed-form tests: pass ``defaults=True`` for them.
CLOSED_FORM = {"objective": "regmean", "alpha": 0.9}


def com_config(models: List[dict], base: Optional[str] = None, defaults: bool = False,
               **params) -> dict:
    if not defaults:
        params = {**CLOSED_FORM, **params}
    cfg = {
        "merge_method": "chain_of_merges",
        "models": [
            {"model": m["model"], "parameters": {k: v for k, v in m.items() if k != "model"}}
            for m in models
        ],
        "parameters": params,
        "dtype": "float32",
    }
    if base:
        cfg["base_model"] = base
    return cfg


def merge(cfg: dict, out: str, **options) -> Dict[str, torch.Tensor]:
    opts = dict(quiet=True, copy_tokenizer=True)
    opts.update(options)
    run_merge(MergeConfiguration.model_validate(cfg), out, options=MergeOptions(**opts))
    return read_tensors(out)


def read_tensors(out: str) -> Dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, f)))
    return tensors


def experts(zoo, n=2, **extra) -> List[dict]:
    return [
        {"model": zoo[f"expert{i}"], "calibration": zoo[f"expert{i}_data"], **extra}
        for i in range(n)
    ]


def count_merged_layers(monkeypatch) -> List[int]:
    """Spy on the walk: the list fills with the index of every layer it merges."""
    from mergekit_com.method.layer import LayerMerge

    merged: List[int] = []
    original = LayerMerge.merge

    def counting(self):
        merged.append(self.index)
        return original(self)

    monkeypatch.setattr(LayerMerge, "merge", counting)
    return merged


def run_cli(args) -> int:
    """mergekit-com in this process; its exit code."""
    from mergekit_com import cli

    try:
        cli.main(args)
        return 0
    except SystemExit as e:
        return e.code
