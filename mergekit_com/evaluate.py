"""Exact-match accuracy and answer loss of a causal LM on zoo task files.

Task files are JSONL with ``{"prompt": ..., "answer": ...}`` records (or, for chat
models, ``{"messages": [...], "answer": ...}``: the messages are rendered with the
tokenizer's chat template and a generation prompt), found as
``<data_dir>/<task>.<split>.jsonl`` (a zoo dir with a ``data/`` folder works too).
Works with any HF causal LM; only ``model.generate`` and ``model(...).logits`` are used.

Every score keeps which prompts were answered right (``correct``, a string of 0/1), so
that ``normalized_accuracy_ci`` can bootstrap a confidence interval by resampling them.

Two backends score the same prompts alike: ``own`` (the default: the greedy loop below)
and ``lm-eval`` (lm-evaluation-harness, ``evaluate_lmeval``; no loss). Ours stays the
default: it is ~3.5x faster on the tiny zoo and also measures the loss (docs/zoo.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

DataSource = Union[str, os.PathLike, Mapping[str, Union[str, os.PathLike]]]
BACKENDS = ("own", "lm-eval")


def _data_dir(source: Union[str, os.PathLike]) -> Path:
    path = Path(source)
    return path / "data" if (path / "data").is_dir() else path


def task_files(source: DataSource, tasks: Optional[Sequence[str]] = None, split: str = "eval") -> Dict[str, Path]:
    """Map task name -> JSONL file, from a {task: file} mapping or a zoo/data dir."""
    if isinstance(source, Mapping):
        files = {t: Path(p) for t, p in source.items()}
    else:
        suffix = f".{split}.jsonl"
        files = {p.name[: -len(suffix)]: p for p in sorted(_data_dir(source).glob(f"*{suffix}"))}
        manifest = Path(source) / "zoo.json"
        if tasks is None and manifest.exists():  # keep the zoo's task order
            tasks = [t for t in json.loads(manifest.read_text())["tasks"] if t in files]
    if tasks is not None:
        missing = [t for t in tasks if t not in files]
        if missing:
            raise FileNotFoundError(f"no {split} data for tasks {missing} in {source}")
        files = {t: files[t] for t in tasks}
    if not files:
        raise FileNotFoundError(f"no *.{split}.jsonl task files in {source}")
    return files


def load_records(path: Union[str, os.PathLike], limit: Optional[int] = None) -> List[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit] if limit else records


def _pad(rows: List[List[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def prompt_ids(tokenizer, prompt) -> List[int]:
    """Token ids of a prompt: a string (with the tokenizer's special tokens), or a list of
    chat messages rendered with its chat template, ending in the assistant's turn."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def record_prompt(record: Mapping):
    """The prompt of an evaluation record: its ``prompt`` text or its ``messages``."""
    return record["prompt"] if "prompt" in record else record["messages"]


@torch.inference_mode()
def score_records(model, tokenizer, records: Sequence[dict], device="cpu", batch_size: int = 128,
                  max_new_tokens: Optional[int] = None) -> Dict[str, float]:
    """Greedy exact-match accuracy, mean answer-token cross-entropy, and which prompts
    were answered right (``correct``: one "0"/"1" per record, in order)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, record_prompt(r)) for r in records]
    answers = [tokenizer(r["answer"], add_special_tokens=False).input_ids for r in records]
    if max_new_tokens is None:  # room for the longest answer, its EOS and a little slack
        max_new_tokens = max(len(a) for a in answers) + 2

    flags: List[str] = []
    nll, n_tokens = 0.0, 0
    for start in range(0, len(records), batch_size):
        sl = slice(start, start + batch_size)
        # generation: left padding so every prompt ends where generation starts
        ids, mask = _pad(prompts[sl], pad_id, left=True)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        for row, rec in zip(out[:, ids.shape[1]:].tolist(), records[sl]):
            if eos_id in row:
                row = row[: row.index(eos_id)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            flags.append("1" if text.strip() == rec["answer"].strip() else "0")

        # loss: right padding, cross-entropy on the answer tokens only
        rows = [p + a for p, a in zip(prompts[sl], answers[sl])]
        ids, mask = _pad(rows, pad_id, left=False)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        target = torch.full_like(ids, -100)
        for i, (p, a) in enumerate(zip(prompts[sl], answers[sl])):
            target[i, len(p): len(p) + len(a)] = torch.tensor(a)
        target = target.to(logits.device)
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        ).item()
        n_tokens += int((target[:, 1:] != -100).sum())
    correct = "".join(flags)
    return {"accuracy": correct.count("1") / len(records), "loss": nll / max(n_tokens, 1),
            "n": len(records), "correct": correct}


def load_model(path: Union[str, os.PathLike], device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def evaluate_model(
    model,
    data: DataSource,
    tasks: Optional[Sequence[str]] = None,
    split: str = "eval",
    device="cpu",
    batch_size: int = 128,
    tokenizer=None,
    limit: Optional[int] = None,
    backend: str = "own",
) -> Dict[str, Dict[str, float]]:
    """Score a model (HF dir, or a loaded model already on `device`) on each task's split.

    A loaded model's tokenizer is read from its ``name_or_path`` unless given.
    ``backend="lm-eval"`` scores through lm-evaluation-harness instead of our greedy loop.

    Returns {task: {"accuracy": exact match in [0, 1], "loss": mean answer-token CE (nan
    with lm-eval), "n": count, "correct": one "0"/"1" per prompt}}.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "lm-eval":  # fail before loading anything
        from .evaluate_lmeval import require_lmeval

        require_lmeval()
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tok = load_model(model, device)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None and os.path.isdir(getattr(model, "name_or_path", "") or ""):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if tokenizer is None:
        raise ValueError("pass tokenizer= when evaluating an already loaded model")
    files = task_files(data, tasks, split)
    if backend == "lm-eval":
        from .evaluate_lmeval import score_files

        return score_files(model, tokenizer, files, split, limit, batch_size)
    return {
        task: score_records(model, tokenizer, load_records(path, limit), device, batch_size)
        for task, path in files.items()
    }


def _acc(value) -> float:
    return float(value["accuracy"] if isinstance(value, Mapping) else value)


def normalized_accuracy(merged_acc: Mapping, expert_acc: Mapping) -> float:
    """Mean over tasks of merged accuracy / the task's own expert accuracy.

    Both arguments map task -> accuracy (or -> an evaluate_model result). Tasks whose
    expert scores 0 are skipped (the ratio is undefined); nan if none remain.
    """
    ratios = [_acc(merged_acc[t]) / _acc(expert_acc[t]) for t in expert_acc if _acc(expert_acc[t]) > 0]
    return sum(ratios) / len(ratios) if ratios else math.nan


BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def _flags(result) -> "np.ndarray":
    import numpy as np

    correct = result["correct"] if isinstance(result, Mapping) else result
    return np.frombuffer(correct.encode(), dtype=np.uint8) - ord("0")


def bootstrap_normalized(merged: Mapping, experts: Mapping, samples: int = BOOTSTRAP_SAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> "np.ndarray":
    """Bootstrap replicates of the normalized accuracy, resampling each task's prompts.

    ``merged`` and ``experts`` map task -> a score with ``correct`` (or the 0/1 string
    itself); both were scored on the same prompts of a task, so each replicate draws
    one set of prompt indices per task (with replacement) and uses it for the merged
    model and the task's expert alike (a paired bootstrap). A replicate where an
    expert gets every drawn prompt wrong skips that task, as normalized_accuracy does.
    The same seed draws the same indices for every model, so the replicates of two
    models are paired too.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    num = np.zeros(samples)
    den = np.zeros(samples)
    for task in experts:
        e, m = _flags(experts[task]), _flags(merged[task])
        if len(e) != len(m):
            raise ValueError(f"task {task}: {len(m)} scored prompts for the model, {len(e)} for its expert")
        idx = rng.integers(0, len(e), size=(samples, len(e)))
        e_acc, m_acc = e[idx].mean(1), m[idx].mean(1)
        ok = e_acc > 0
        num[ok] += m_acc[ok] / e_acc[ok]
        den += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def normalized_accuracy_ci(merged: Mapping, experts: Mapping, level: float = 0.95,
                           samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> List[float]:
    """[low, high]: the percentile bootstrap interval of normalized_accuracy (see
    bootstrap_normalized); ``merged``/``experts`` map task -> scores with ``correct``."""
    import numpy as np

    reps = bootstrap_normalized(merged, experts, samples, seed)
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return [math.nan, math.nan]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(reps, [tail, 100 - tail])
    return [float(low), float(high)]


def markdown_table(results: Mapping[str, Mapping[str, Mapping]], key: str = "accuracy") -> str:
    """Rows = models, columns = tasks (+ mean); results is {model: evaluate_model(...)}."""
    tasks = list(next(iter(results.values())))
    fmt = (lambda v: f"{100 * v:.1f}") if key == "accuracy" else (lambda v: f"{v:.3f}")
    lines = [
        "| model | " + " | ".join(tasks) + " | mean |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name, res in results.items():
        vals = [res[t][key] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(sum(vals) / len(vals))} |")
    return "\n".join(lines)


def _expert_accuracies(zoo: Path, split: str) -> Optional[Dict[str, float]]:
    """Each expert's accuracy on its own task, from the zoo manifest (if any)."""
    manifest = zoo / "zoo.json"
    if not manifest.exists():
        return None
    m = json.loads(manifest.read_text())
    table = m.get("results", {}).get(split, {})
    experts = {t: table.get(f"expert_{t}", {}).get(t) for t in m["tasks"]}
    return {t: r["accuracy"] for t, r in experts.items() if r} or None


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mergekit_com.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="HF model dirs to score")
    ap.add_argument("--zoo", required=True, help="zoo dir (or a dir of <task>.<split>.jsonl files)")
    ap.add_argument("--split", default="eval", choices=["eval", "val"])
    ap.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N records per task")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on shared cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="own", choices=BACKENDS,
                    help="own greedy loop (default: faster, also the loss) or lm-evaluation-harness "
                         "(needs mergekit-com[eval])")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the libraries' output too")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit_com.quiet import quiet_libraries

    quiet_libraries(args.verbose)
    torch.set_num_threads(args.threads)
    from .evaluate_lmeval import LmEvalMissing, require_lmeval
    from .zoo.tasks import task_names

    try:  # the lm-eval extra missing, a misspelt task or a wrong --zoo: one line, before any loading
        tasks = task_names(args.tasks)
        if args.backend == "lm-eval":
            require_lmeval()
        task_files(args.zoo, tasks, args.split)
    except (LmEvalMissing, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        results = {
            m: evaluate_model(m, args.zoo, tasks, args.split, args.device, args.batch_size, limit=args.limit,
                              backend=args.backend)
            for m in args.models
        }
    except LmEvalMissing as e:  # the lm-eval backend without the extra: one line
        sys.exit(f"error: {e}")
    print(markdown_table(results, "accuracy"))
    if args.backend == "own":  # lm-eval measures no loss
        print()
        print(markdown_table(results, "loss").replace("| model |", "| model (loss) |"))
    # the manifest's expert scores cover the whole split: not comparable under --limit
    experts = None if args.limit else _expert_accuracies(Path(args.zoo), args.split)
    if experts:
        print()
        for m, res in results.items():
            common = {t: experts[t] for t in res if t in experts}
            print(f"normalized accuracy of {m}: {100 * normalized_accuracy(res, common):.1f}%")


if __name__ == "__main__":
    main()
