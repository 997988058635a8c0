"""The lm-eval backend of ``mergekit_com.evaluate`` (``--backend lm-eval``).

Scores through lm-evaluation-harness's Python API (``simple_evaluate`` with an
``HFLM`` around the already loaded model) on task configs written by
``zoo.lmeval_tasks`` into a temporary folder, for exactly the files and records
being scored: the zoo's own ``ZOO/tasks`` may be absent, stale or read-only.
lm-eval sorts prompts by length before batching, so its batches pad differently
from ours and padding could flip a near-tie answer; batch size 1 rules that out,
and at 128 the two backends still agreed on every prompt of the tiny and chat
zoos' 14 models (docs/zoo.md). lm-eval computes no answer-token loss: ``loss``
is nan here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .zoo.lmeval_tasks import METRIC, write_task_configs

MISSING = "the lm-eval backend needs lm-evaluation-harness: pip install 'mergekit-com[eval]'"
PREFIX = "mergekit_com"  # task names of the temporary configs: mergekit_com_<task>[_val]


class LmEvalMissing(ImportError):
    """lm-eval is not installed; the message is one line naming the extra to install."""


def require_lmeval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise LmEvalMissing(MISSING) from e


def _quiet_unless_logging():
    """lm-eval's progress bars go to stderr whenever its logger would show warnings;
    ``quiet.quiet_libraries`` turns that logger down, and with it the bars. The git it
    runs for its environment record writes to the process's stderr itself ("fatal: not a
    git repository" outside one), so that is hidden too."""
    if logging.getLogger("lm_eval").isEnabledFor(logging.WARNING):
        return contextlib.nullcontext()
    return _stderr_hidden()


@contextlib.contextmanager
def _stderr_hidden():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _task_manager(include_path: str):
    from lm_eval.tasks import TaskManager

    # indexing lm-eval's ~15,000 built-in tasks takes ~7 s on this CPU; ours need none
    return TaskManager(include_path=include_path, include_defaults=False)


def score_files(model, tokenizer, files: Mapping[str, os.PathLike], split: str = "eval",
                limit: int | None = None, batch_size: int = 128) -> dict[str, dict]:
    """{task: {"accuracy", "loss" (nan), "n", "correct"}} for a loaded HF causal LM on
    each ``task -> jsonl`` file, like ``evaluate.score_records`` but through lm-eval."""
    require_lmeval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="mergekit_com_lmeval_") as tmp:
        names = write_task_configs(tmp, PREFIX, {(t, split): Path(p) for t, p in files.items()},
                                   tokenizer, limit)
        with _quiet_unless_logging():
            # it warns that a loaded model skips its multi-process set-up: we pass one on purpose
            hf_log = logging.getLogger("lm_eval.models.huggingface")
            level, _ = hf_log.level, hf_log.setLevel(logging.ERROR)
            try:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            finally:
                hf_log.setLevel(level)
            # greedy needs no seed: leave the caller's random, numpy and torch states alone
            out = simple_evaluate(model=lm, tasks=list(names.values()), task_manager=_task_manager(tmp),
                                  limit=limit, log_samples=True, bootstrap_iters=0, random_seed=None,
                                  numpy_random_seed=None, torch_random_seed=None)
    scores = {}
    for (task, _split), name in names.items():
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        correct = "".join("1" if s["exact_match"] else "0" for s in samples)
        accuracy = correct.count("1") / len(correct)
        if not math.isclose(accuracy, out["results"][name][METRIC]):  # the samples are the score's
            raise RuntimeError(f"lm-eval's {name} samples do not add up to its {METRIC}")
        scores[task] = {"accuracy": accuracy, "loss": math.nan, "n": len(correct), "correct": correct}
    return scores
