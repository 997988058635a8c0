"""The zoo's lm-eval task configs and the evaluator's lm-eval backend.

Both backends must score every prompt alike. The seconds-long zoos here are the
quick preset trained just enough (parity and count, 100 pretraining steps on true
answers) that their models answer some prompts right and some wrong: on the plain
quick zoo every answer is wrong, and agreement on all-wrong would prove nothing.
"""

import importlib.util
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from mergekit_com import evaluate
from mergekit_com.evaluate import evaluate_model, load_model
from mergekit_com.zoo import build_zoo

torch.set_num_threads(1)
# everything but the missing-extra tests needs lm-eval (in the `test` extra)
needs_lmeval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")

MIXED = {"tasks": ("parity", "count"), "pretrain_steps": 100, "pretrain_correct_frac": 1.0,
         "n_val": 24, "n_eval": 24}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def zoo(request, tmp_path_factory):
    return build_zoo(out_dir=tmp_path_factory.mktemp("zoo"), quick=True, chat=request.param, **MIXED)


def _task_manager(path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(path), include_defaults=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # get_task_dict: the API of lm-eval < 0.4.13 too
@needs_lmeval
def test_emitted_configs_load_in_lm_eval_and_render_our_prompts(zoo, datasets_cache):
    from lm_eval.tasks import get_task_dict

    tasks_dir = zoo.root / "tasks"
    prefix = zoo.preset
    names = [f"{prefix}_{t}{s}" for t in zoo.tasks for s in ("", "_val")]
    assert sorted(p.name for p in tasks_dir.iterdir()) == sorted(
        [f"{n}.yaml" for n in names] + [f"{prefix}.yaml", f"{prefix}_val.yaml", "README.md"])
    manager = _task_manager(tasks_dir)
    assert set(names + [prefix, f"{prefix}_val"]) <= set(manager.all_tasks)

    loaded = get_task_dict(names, manager)
    tokenizer = load_model(zoo.base)[1]
    for name, task in loaded.items():
        split = "val" if name.endswith("_val") else "eval"
        data = zoo.data_file(name[len(prefix) + 1:].removesuffix("_val"), split)
        records = [json.loads(line) for line in data.read_text().splitlines()]
        docs = list(task.test_docs())
        assert len(docs) == len(records) == 24
        for doc, record in zip(docs, records):
            # the exact string the evaluator tokenizes (chat: rendered with the chat template)
            ours = record["prompt"] if "prompt" in record else tokenizer.apply_chat_template(
                record["messages"], tokenize=False, add_generation_prompt=True)
            assert task.doc_to_text(doc) == ours
            assert task.doc_to_target(doc) == record["answer"].strip()
        assert task.config.generation_kwargs["until"] == [tokenizer.eos_token]
    # the groups hold the eval and the val tasks
    groups = get_task_dict([prefix, f"{prefix}_val"], manager)
    assert sorted(sorted(tasks) for tasks in groups.values()) == sorted([sorted(n for n in names if n.endswith("_val")),
                                            sorted(n for n in names if not n.endswith("_val"))])


@needs_lmeval
def test_both_backends_score_every_prompt_alike(zoo, datasets_cache):
    flags = ""
    for name, path in zoo.model_dirs().items():
        model, tokenizer = load_model(path)
        for split in ("eval", "val"):
            own = evaluate_model(model, zoo.root, split=split, tokenizer=tokenizer)
            ours_via_lmeval = evaluate_model(model, zoo.root, split=split, tokenizer=tokenizer,
                                             backend="lm-eval")
            for task in zoo.tasks:
                a, b = own[task], ours_via_lmeval[task]
                assert (b["correct"], b["n"], b["accuracy"]) == (a["correct"], a["n"], a["accuracy"]), \
                    f"{name} {split} {task}"
                flags += a["correct"]
    assert "0" in flags and "1" in flags, "the zoo's models must answer some prompts right, some wrong"


@needs_lmeval
def test_limit_scores_the_first_records_alike(zoo, datasets_cache):
    own = evaluate_model(zoo.multitask, zoo.root, limit=7)
    via = evaluate_model(zoo.multitask, zoo.root, limit=7, backend="lm-eval")
    assert {t: r["correct"] for t, r in via.items()} == {t: r["correct"] for t, r in own.items()}
    assert all(r["n"] == 7 for r in via.values())


def test_existing_zoo_gets_the_builders_configs(zoo, tmp_path):
    from mergekit_com.zoo.__main__ import main

    main(["--write-lm-eval-tasks", str(zoo.root), "--tasks-dir", str(tmp_path / "t")])
    built = {p.name: p.read_text() for p in (zoo.root / "tasks").iterdir()}
    rewritten = {p.name: p.read_text() for p in (tmp_path / "t").iterdir()}
    assert {k: v for k, v in rewritten.items() if k != "README.md"} == \
        {k: v for k, v in built.items() if k != "README.md"}


@needs_lmeval
def test_bench_scores_merges_with_the_chosen_backend(zoo, tmp_path, datasets_cache):
    from mergekit_com.bench.quality import QualityBench

    bench = QualityBench(zoo, tmp_path, backend="lm-eval")
    scores = bench._score(zoo.multitask, "eval")
    assert {t: s["correct"] for t, s in scores.items()} == \
        {t: s["correct"] for t, s in zoo.results["eval"]["multitask"].items()}


@pytest.fixture
def no_lmeval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError


def test_missing_extra_is_one_line_before_any_loading(no_lmeval, tmp_path):
    from mergekit_com.evaluate_lmeval import LmEvalMissing

    # a model that does not exist: the missing extra is reported first
    with pytest.raises(LmEvalMissing, match=r"pip install 'mergekit-com\[eval\]'"):
        evaluate_model(tmp_path / "no_model", tmp_path, backend="lm-eval")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(tmp_path / "no_model"), "--zoo", str(tmp_path), "--backend", "lm-eval"])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "mergekit-com[eval]" in message and "\n" not in message


def test_bench_refuses_the_missing_extra_before_merging(no_lmeval, tmp_path):
    from mergekit_com.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["quality", "--backend", "lm-eval", "--zoo", str(tmp_path / "no_zoo"), "--out", str(tmp_path)])
    assert "mergekit-com[eval]" in str(exit_.value.code)
    assert list(tmp_path.iterdir()) == []  # no zoo built, no merge


@needs_lmeval
def test_lmeval_scoring_prints_nothing_of_its_own_outside_a_git_repository(zoo, tmp_path, capfd,
                                                                           monkeypatch, datasets_cache):
    """lm-eval runs `git describe` for its environment record; outside a repository git
    writes "fatal: not a git repository" straight to the process's stderr."""
    from mergekit_com.quiet import quiet_libraries

    quiet_libraries()
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    evaluate_model(zoo.multitask, zoo.root, limit=2, backend="lm-eval")
    err = capfd.readouterr().err
    assert "fatal" not in err and "git" not in err, err
