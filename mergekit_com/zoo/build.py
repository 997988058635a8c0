"""Build (or reuse) an expert zoo: one base, one expert per task, one multi-task model.

Layout under ``out_dir``::

    base/  expert_<task>/  multitask/      HF model dirs (safetensors + tokenizer)
    data/<task>.{calib,val,eval}.jsonl     calibration text / held-out prompt+answer
                                           (chat presets: {"messages": [...]} records)
    tasks/                                 lm-eval task configs of the val/eval files
                                           (zoo.lmeval_tasks; not part of the settings hash)
    zoo.json                               manifest, written last (marks a complete build)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .lmeval_tasks import write_tasks_for
from .presets import MODEL_BUILDERS, ZooPreset, get_preset
from .tasks import Instance, Sample, get_task, make_splits, needs_marker

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the build recipe changes, to invalidate caches
# 2: scores keep the per-prompt results (``correct``) that the bootstrap intervals resample
# Measured on 2 cores: 2 threads is ~1.4x faster than 1 when the machine is idle, but
# ~10x slower when another process is busy (OpenMP threads wait on each other).
DEFAULT_THREADS = 1


@dataclass
class ZooManifest:
    root: Path
    preset: str
    tasks: List[str]
    settings: dict
    settings_hash: str
    build_seconds: float = 0.0
    build_phases: Dict[str, float] = field(default_factory=dict)  # seconds: pretrain, experts, ...
    # {split: {model name: {task: {"accuracy", "loss", "n"}}}}; model names as in model_dirs
    results: Dict[str, Dict[str, Dict[str, dict]]] = field(default_factory=dict)
    # same shape, for stock mergekit merges of the experts (see zoo.baselines)
    baselines: Dict[str, Dict[str, Dict[str, dict]]] = field(default_factory=dict)
    cached: bool = False  # True when build_zoo reused an existing build

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def multitask(self) -> Path:
        return self.root / "multitask"

    @property
    def experts(self) -> Dict[str, Path]:
        return {t: self.root / f"expert_{t}" for t in self.tasks}

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def data_file(self, task: str, split: str) -> Path:
        return self.data_dir / f"{task}.{split}.jsonl"

    def model_dirs(self) -> Dict[str, Path]:
        return {"base": self.base, **{f"expert_{t}": p for t, p in self.experts.items()},
                "multitask": self.multitask}

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root"), d.pop("cached")
        # paths relative to the zoo dir, so it can be moved
        d["models"] = {k: str(p.relative_to(self.root)) for k, p in self.model_dirs().items()}
        d["data"] = {t: {s: str(self.data_file(t, s).relative_to(self.root)) for s in ("calib", "val", "eval")}
                     for t in self.tasks}
        return d

    def save(self) -> None:
        (self.root / "zoo.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def accuracy_table(self, split: str = "eval") -> Dict[str, Dict[str, float]]:
        """{model: {task: accuracy}} for the zoo's models (and any baselines)."""
        rows = {**self.results.get(split, {}), **self.baselines.get(split, {})}
        return {m: {t: r["accuracy"] for t, r in res.items()} for m, res in rows.items()}

    @classmethod
    def load(cls, root) -> "ZooManifest":
        d = json.loads((Path(root) / "zoo.json").read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(root=Path(root), **{k: v for k, v in d.items() if k in names})


# An expert has learnt its task when it answers at least this share of its val prompts, and
# this much more than the base: below that, the normalized accuracy (merged / expert) divides
# by a few lucky prompts, or credits the base's own skill.
MIN_EXPERT_ACCURACY = 0.10


def weak_experts(manifest: "ZooManifest", split: str = "val") -> Dict[str, Tuple[float, float]]:
    """{task: (its expert's accuracy, the base's)} for the experts that did not learn their task."""
    scores = manifest.results.get(split, {})
    weak = {}
    for task in manifest.tasks:
        own = scores.get(f"expert_{task}", {}).get(task)
        if own is None:
            continue
        base = scores.get("base", {}).get(task, {}).get("accuracy", 0.0)
        if min(own["accuracy"], own["accuracy"] - base) < MIN_EXPERT_ACCURACY:
            weak[task] = (own["accuracy"], base)
    return weak


def describe_weak_experts(manifest: "ZooManifest") -> Optional[str]:
    """One warning line naming the experts that did not learn their task (None if all did)."""
    weak = weak_experts(manifest)
    if not weak:
        return None
    named = ", ".join(f"expert_{t} {100 * e:.1f}% (base {100 * b:.1f}%)" for t, (e, b) in weak.items())
    return (f"warning: these experts did not learn their task (val accuracy): {named}; the normalized "
            f"accuracy divides by their scores, so their tasks add noise to it: leave them out (--tasks)")


def default_zoo_dir(preset: str, seed: int = 0) -> Path:
    """zoo_cache/<preset>, or zoo_cache/<preset>-seed<N> for another seed."""
    return Path("zoo_cache") / (preset if not seed else f"{preset}-seed{seed}")


def _hash(settings: dict) -> str:
    marked = not settings.get("chat") and any(needs_marker(t) for t in settings.get("tasks", ()))
    # only zoos whose data the " =" marker changed get a new hash (and a rebuild)
    blob = json.dumps({"format": FORMAT_VERSION, **settings, **({"marker": 1} if marked else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _save(model, tokenizer, path: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _cached(root: Path, digest: str) -> Optional[ZooManifest]:
    if not (root / "zoo.json").exists():
        return None
    try:
        manifest = ZooManifest.load(root)
    except (ValueError, TypeError, KeyError):
        return None
    complete = all((p / "config.json").exists() for p in manifest.model_dirs().values())
    if manifest.settings_hash != digest or not complete:
        return None
    manifest.cached = True
    return manifest


def build_zoo(
    preset: str = "tiny",
    out_dir: str | os.PathLike = "zoo_cache/tiny",
    tasks: Optional[Sequence[str]] = None,
    quick: bool = False,
    threads: int = DEFAULT_THREADS,
    force: bool = False,
    device: str = "cpu",
    **overrides,
) -> ZooManifest:
    """Build the zoo into out_dir, or return the existing build if its settings match.

    quick=True swaps in the seconds-long "quick" preset (for tests); ``overrides``
    replace any ZooPreset field, e.g. ``finetune_steps=100``.
    """
    spec: ZooPreset = get_preset("quick" if quick else preset, **overrides)
    if tasks is not None:
        spec = dataclasses.replace(spec, tasks=tuple(tasks))
    if not spec.tasks:
        raise ValueError("a zoo needs at least one task")
    for name in spec.tasks:
        get_task(name)  # fail before any training on a typo
    if len(set(spec.tasks)) != len(spec.tasks):  # one expert dir per task: a repeat would overwrite it
        raise ValueError(f"a task is listed twice: {','.join(spec.tasks)}")
    digest = _hash(spec.settings())
    root = Path(out_dir)
    if not force and (hit := _cached(root, digest)) is not None:
        log.info("zoo cache hit: %s", root)
        return hit

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(spec, root, digest, device)
    finally:
        torch.set_num_threads(prev_threads)


def _build(spec: ZooPreset, root: Path, digest: str, device: str = "cpu") -> ZooManifest:
    t0 = time.time()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "zoo.json").unlink(missing_ok=True)  # a half-written build must never look complete

    base, tokenizer = MODEL_BUILDERS[spec.builder](spec)
    base.to(device)
    data = _write_data(spec, root / "data")
    write_tasks_for(root, spec.name, spec.tasks, tokenizer=tokenizer)
    # chat presets: every prompt is a user turn (rendered with the chat template)
    turn = (lambda p: [{"role": "user", "content": p}]) if spec.chat else (lambda p: p)
    train = {t: [(turn(p), a, d) for p, a, d in s.train] for t, s in data.items()}
    solved = {t: [(p, a) for p, a, _ in train[t]] for t in data}  # true answers only

    phases: Dict[str, float] = {}
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        phases[name] = round(time.time() - mark, 1)
        mark = time.time()

    if spec.pretrain_steps:  # scratch bases learn the formats first; real bases already know text
        log.info("pretraining base on %s", ", ".join(spec.tasks))
        _train(base, tokenizer, _pretrain_corpus(spec, train), spec.pretrain_steps, spec.pretrain_lr,
               spec, seed=spec.seed, answer_only=False, weight_decay=spec.pretrain_weight_decay)
    _save(base, tokenizer, root / "base")
    lap("base")

    for i, task in enumerate(spec.tasks):
        log.info("fine-tuning expert_%s", task)
        expert = copy.deepcopy(base)
        _train(expert, tokenizer, solved[task], spec.finetune_steps, spec.finetune_lr, spec,
               seed=spec.seed + 1 + i, answer_only=True)
        _save(expert, tokenizer, root / f"expert_{task}")
    lap("experts")

    log.info("fine-tuning multitask")
    multi = copy.deepcopy(base)
    _train(multi, tokenizer, [x for t in spec.tasks for x in solved[t]], spec.multitask_steps,
           spec.multitask_lr, spec, seed=spec.seed + 1000, answer_only=True)
    _save(multi, tokenizer, root / "multitask")
    lap("multitask")

    manifest = ZooManifest(root=root, preset=spec.name, tasks=list(spec.tasks),
                           settings=spec.settings(), settings_hash=digest)
    log.info("scoring the zoo")
    manifest.results = _score_all(manifest, device)
    lap("scoring")
    manifest.build_phases = phases
    manifest.build_seconds = round(time.time() - t0, 1)
    manifest.save()
    return manifest


def _train(model, tokenizer, samples, steps, lr, spec: ZooPreset, seed, answer_only, weight_decay=0.0):
    from .train import train_lm

    losses = train_lm(model, tokenizer, samples, steps=steps, lr=lr, batch_size=spec.batch_size,
                      seed=seed, answer_only=answer_only, weight_decay=weight_decay)
    if losses:
        log.info("  %d steps, loss %.3f -> %.3f", steps, losses[0], sum(losses[-20:]) / len(losses[-20:]))


def _pretrain_corpus(spec: ZooPreset, train: Dict[str, List[Instance]]) -> List[Sample]:
    """Every task, answered right only a fraction of the time, else with its distractor.

    The base thus learns each format and skill but greedily answers with the
    mistake: weak at every task, yet a gentle fine-tune can make it strong.
    """
    rng = random.Random(f"pretrain:{spec.seed}")
    return [
        (p, a if rng.random() < spec.pretrain_correct_frac else d)
        for t in spec.tasks
        for p, a, d in train[t]
    ]


def _write_data(spec: ZooPreset, data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for task in spec.tasks:
        s = make_splits(task, spec.n_train, spec.n_calib, spec.n_val, spec.n_eval, seed=spec.seed,
                        plain=not spec.chat)
        if spec.chat:
            _write_jsonl(data_dir / f"{task}.calib.jsonl",
                         [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                          for p, a in s.calib])
            for split in ("val", "eval"):
                _write_jsonl(data_dir / f"{task}.{split}.jsonl",
                             [{"messages": [{"role": "user", "content": p}], "answer": a}
                              for p, a in getattr(s, split)])
        else:
            _write_jsonl(data_dir / f"{task}.calib.jsonl", [{"text": p + a} for p, a in s.calib])
            for split in ("val", "eval"):
                _write_jsonl(data_dir / f"{task}.{split}.jsonl",
                             [{"prompt": p, "answer": a} for p, a in getattr(s, split)])
        splits[task] = s
    return splits


def _score_all(manifest: ZooManifest, device: str = "cpu") -> Dict[str, Dict[str, Dict[str, dict]]]:
    from ..evaluate import evaluate_model

    results: Dict[str, Dict[str, Dict[str, dict]]] = {"val": {}, "eval": {}}
    for name, path in manifest.model_dirs().items():
        for split in results:
            results[split][name] = evaluate_model(path, manifest.data_dir, manifest.tasks, split, device)
    return results
