"""A zoo's tasks as lm-evaluation-harness task configs (``ZOO/tasks/*.yaml``).

    lm_eval --model hf --model_args pretrained=OUT --include_path ZOO/tasks --tasks tiny

Each config scores one ``data/<task>.<split>.jsonl`` file exactly as
``mergekit_com.evaluate`` does: greedy generation up to the EOS token or the
longest answer + 2 tokens, both sides stripped, exact match. Chat zoos' records
hold ``messages`` (one user turn); their prompt is rendered with the zoo
tokenizer's chat template into ``doc_to_text``, so no ``--apply_chat_template``
is needed (and it must not be given: it would wrap the prompt twice).

Data paths are absolute (lm-eval hands ``data_files`` to ``datasets`` as they
are, relative to the working directory): a moved zoo rewrites its configs with
``python -m mergekit_com.zoo --write-lm-eval-tasks ZOO``. This module does not
import ``mergekit_com.evaluate`` (whose lm-eval backend uses it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

FILTER = "strip"  # the name lm-eval reports the metric under: "exact_match,strip"
METRIC = f"exact_match,{FILTER}"
SPLITS = ("eval", "val")
_SENTINEL = "\x00PROMPT\x00"


def task_name(prefix: str, task: str, split: str) -> str:
    """``<prefix>_<task>`` for the eval split, ``<prefix>_<task>_<split>`` for another."""
    return f"{prefix}_{task}" if split == "eval" else f"{prefix}_{task}_{split}"


def group_name(prefix: str, split: str) -> str:
    return prefix if split == "eval" else f"{prefix}_{split}"


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit] if limit else records


def _raw(text: str) -> str:
    """Literal text inside a Jinja template."""
    return "{% raw %}" + text + "{% endraw %}" if ("{" in text or "%" in text) else text


def chat_doc_to_text(tokenizer) -> str:
    """A Jinja ``doc_to_text`` rendering a record's single user turn the way
    ``evaluate.prompt_ids`` does: the chat template with a generation prompt."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user's message verbatim")
    before, after = rendered.split(_SENTINEL)
    return _raw(before) + "{{messages[0].content}}" + _raw(after)


def max_gen_toks(tokenizer, records: Sequence[Mapping]) -> int:
    """The evaluator's generation budget: the longest answer, its EOS and a little slack."""
    return max(len(tokenizer(r["answer"], add_special_tokens=False).input_ids) for r in records) + 2


def task_config(name: str, data_file: Path, tokenizer, records: Sequence[Mapping]) -> dict:
    """One lm-eval task scoring ``data_file`` (whose records are ``records``)."""
    chat = "messages" in records[0]
    if chat and any(len(r["messages"]) != 1 or r["messages"][0]["role"] != "user" for r in records):
        raise ValueError(f"{data_file}: chat records must hold exactly one user message")
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": chat_doc_to_text(tokenizer) if chat else "{{prompt}}",
        "doc_to_target": "{{answer|trim}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": [tokenizer.eos_token], "do_sample": False,
                              "max_gen_toks": max_gen_toks(tokenizer, records)},
        "filter_list": [{"name": FILTER, "filter": [{"function": "remove_whitespace"},
                                                    {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def group_config(name: str, tasks: Sequence[str]) -> dict:
    """A group whose score is the unweighted mean of its tasks' exact match."""
    return {
        "group": name,
        "task": list(tasks),
        "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": False,
                                   "filter_list": [FILTER]}],
        "metadata": {"version": 1.0},
    }


def _dump(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def write_task_configs(out_dir: os.PathLike, prefix: str, files: Mapping[tuple[str, str], os.PathLike],
                       tokenizer, limit: int | None = None) -> dict[tuple[str, str], str]:
    """Write one config per ``(task, split) -> jsonl file``; returns their lm-eval task names.

    ``limit`` sizes the generation budget on the first ``limit`` records only, as the
    evaluator does when it scores only those.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for (task, split), path in files.items():
        name = task_name(prefix, task, split)
        _dump(task_config(name, Path(path), tokenizer, _read_jsonl(Path(path), limit)), out / f"{name}.yaml")
        names[(task, split)] = name
    return names


def write_zoo_tasks(zoo_dir: os.PathLike, out_dir: os.PathLike | None = None, tokenizer=None) -> Path:
    """Write a built zoo's task configs (eval and val splits), one group per split and a
    README into ``out_dir`` (default ``ZOO/tasks``); returns that folder.

    The tokenizer (for EOS, answer lengths and chat rendering) is the base model's.
    """
    zoo = Path(zoo_dir)
    manifest = json.loads((zoo / "zoo.json").read_text()) if (zoo / "zoo.json").exists() else None
    if manifest is None:
        raise FileNotFoundError(f"{zoo} is not a built zoo (no zoo.json)")
    return write_tasks_for(zoo, manifest["preset"], manifest["tasks"], out_dir, tokenizer)


def write_tasks_for(zoo: Path, prefix: str, tasks: Sequence[str], out_dir: os.PathLike | None = None,
                    tokenizer=None) -> Path:
    """write_zoo_tasks for a zoo whose manifest is not written yet (the builder's case)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(zoo / "base"))
    out = Path(out_dir) if out_dir is not None else zoo / "tasks"
    files = {(t, s): zoo / "data" / f"{t}.{s}.jsonl" for s in SPLITS for t in tasks}
    names = write_task_configs(out, prefix, files, tokenizer)
    for split in SPLITS:
        _dump(group_config(group_name(prefix, split), [names[(t, split)] for t in tasks]),
              out / f"{group_name(prefix, split)}.yaml")
    (out / "README.md").write_text(_readme(prefix, tasks, out))
    return out


def _readme(prefix: str, tasks: Sequence[str], out: Path) -> str:
    rows = "\n".join(f"| `{task_name(prefix, t, 'eval')}` | `{task_name(prefix, t, 'val')}` | {t} |"
                     for t in tasks)
    return f"""# lm-eval tasks of the `{prefix}` zoo

Written by mergekit-com (`python -m mergekit_com.zoo --write-lm-eval-tasks ZOO` rewrites them,
e.g. after moving the zoo: the data paths are absolute). Score any model or merge with

    lm_eval --model hf --model_args pretrained=OUT,dtype=float32 --include_path {out} --tasks {prefix}

Groups: `{group_name(prefix, 'eval')}` (every task's eval split, unweighted mean) and
`{group_name(prefix, 'val')}`. The metric is `exact_match` under the filter `{FILTER}`. Do not pass
`--apply_chat_template`: chat prompts are already rendered with the zoo's chat template.
This reproduces `python -m mergekit_com.evaluate` (float32, greedy) prompt for prompt at
`--batch_size 1`; larger batches pad prompts differently from it, which could flip a near-tie
answer (at 128 none did on the zoos measured in mergekit-com's docs/zoo.md).

| eval task | val task | zoo task |
|---|---|---|
{rows}
"""
