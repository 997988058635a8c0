"""tokenizer_source (base, union) and chat_template with chain_of_merges.

The probe: expert1 with its vocabulary renumbered (embedding and head rows
moved along, one extra token) computes the same function as expert1. Merged
with expert0 it must give exactly the merge of expert0 and expert1 -- which
holds only if mergekit's row permutation is applied *and* every expert's
calibration is tokenized with the output vocabulary (tokenized with its own
one, the renumbered expert's statistics would come from the wrong rows).
"""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from tests.support import pico
from tests.support.merging import com_config, merge, read_tensors

VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def renumbered(zoo2, tmp_path_factory):
    """expert1 with a shuffled vocabulary plus one extra token, and the reference merge."""
    root = tmp_path_factory.mktemp("renumbered")
    chars = list(pico.CHARS)
    order = torch.randperm(len(chars), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = pico.SPECIALS + [chars[i] for i in order] + ["<extra>"]
    old_id = {t: i for i, t in enumerate(pico.SPECIALS + chars)}
    tensors = read_tensors(zoo2["expert1"])
    for name in VOCAB_ROWS:
        rows = tensors[name]
        extra = rows.mean(0, keepdim=True)  # a row only B has
        tensors[name] = torch.cat([rows[[old_id[t] for t in tokens[:-1]]], extra])
    config = pico.llama_config(vocab_size=len(tokens))
    path = pico.save_model(str(root / "renumbered"), config, tensors,
                           tokenizer=pico.make_tokenizer(tokens))
    reference = merge(pair(zoo2, zoo2["expert1"]), str(root / "reference"))
    return {"zoo": zoo2, "path": path, "reference": reference,
            "extra_row": tensors["model.embed_tokens.weight"][-1]}


def pair(zoo, second, **top):
    cfg = com_config([{"model": zoo["expert0"], "calibration": zoo["expert0_data"]},
                      {"model": second, "calibration": zoo["expert1_data"]}],
                     base=zoo["expert0"])
    cfg.update(top)
    return cfg


def assert_close(actual, expected, name):
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("source", ["base", "union"])
def test_renumbered_expert_merges_as_the_original(renumbered, tmp_path, source):
    out = str(tmp_path / source)
    merged = merge(pair(renumbered["zoo"], renumbered["path"], tokenizer_source=source), out)
    n = pico.VOCAB
    for name, value in renumbered["reference"].items():
        got = merged[name][:n] if name in VOCAB_ROWS else merged[name]
        assert_close(got, value, name)
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    config = json.load(open(os.path.join(out, "config.json")))
    if source == "base":
        assert merged["model.embed_tokens.weight"].shape[0] == n == config["vocab_size"]
        assert "<extra>" not in vocab
    else:  # the token only B has keeps B's row
        extra = vocab["<extra>"]
        assert config["vocab_size"] == len(vocab) == n + 1
        assert_close(merged["model.embed_tokens.weight"][extra], renumbered["extra_row"], "extra")


def with_template(expert_dir, out_dir, template):
    """A copy of an expert whose own tokenizer carries ``template``."""
    shutil.copytree(expert_dir, out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.chat_template = template
    tok.save_pretrained(out_dir)
    return str(out_dir)


def test_chat_template_renders_message_calibration_and_the_output(zoo2, tmp_path):
    chatml = _chatml()
    data = _chat_data(tmp_path)

    def run(name, models, **top):
        cfg = com_config([{"model": m, "calibration": str(data)} for m in models])
        cfg.update(top)
        return merge(cfg, str(tmp_path / name))

    experts = [zoo2["expert0"], zoo2["expert1"]]
    named = run("named", experts, chat_template="chatml")
    own = run("own", [with_template(e, tmp_path / f"chatml{i}", chatml)
                      for i, e in enumerate(experts)])
    plain = run("plain", experts)  # the experts' own (non-chatml) template
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(named[q], own[q])
    assert not torch.allclose(named[q], plain[q])
    assert AutoTokenizer.from_pretrained(tmp_path / "named").chat_template == chatml
    assert (tmp_path / "named" / "generation_config.json").exists()


def test_calibration_is_tokenized_again_only_for_another_tokenizer(zoo2, tmp_path, monkeypatch):
    """The pre-flight check's tokenization is the walk's unless the output's tokenizer
    (tokenizer_source, chat_template) differs from each expert's own; then the walk
    tokenizes again with it (the tests above check what that data gives)."""
    from mergekit_com.io import calibration

    calls = []
    real = calibration.tokenize_records

    def counted(records, tokenizer, *args, **kwargs):
        calls.append(tokenizer.name_or_path)
        return real(records, tokenizer, *args, **kwargs)

    monkeypatch.setattr(calibration, "tokenize_records", counted)
    merge(pair(zoo2, zoo2["expert1"]), str(tmp_path / "own"))
    assert len(calls) == 2  # once per expert, by the check
    calls.clear()
    merge(pair(zoo2, zoo2["expert1"], tokenizer_source="base"), str(tmp_path / "base"))
    assert len(calls) == 4  # the check's own, then the output vocabulary's


def test_the_checks_load_each_tokenizer_once(zoo2, tmp_path, monkeypatch):
    """The vocabulary check's tokenizer is the calibration check's (and so the walk's
    tokenization): one load per expert before mergekit writes the output's."""
    from mergekit_com.integration import preflight

    loads = []
    real = AutoTokenizer.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(os.path.normpath(str(path)))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counted))
    cfg = com_config([{"model": zoo2[f"expert{i}"], "calibration": zoo2[f"expert{i}_data"]}
                      for i in range(2)])
    merge(cfg, str(tmp_path / "out"), copy_tokenizer=False)
    assert sorted(loads) == sorted(os.path.normpath(zoo2[f"expert{i}"]) for i in range(2))
    assert not preflight._TOKENIZERS  # none kept after the plan


def _chat_data(tmp_path):
    chats = [{"messages": [{"role": "user", "content": t[:10]},
                           {"role": "assistant", "content": t[10:]}]}
             for t in pico.sample_texts(7)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return str(data)


def _chatml():
    from importlib.resources import files

    from mergekit._data import chat_templates

    return files(chat_templates).joinpath("chatml.jinja").read_text()


def test_the_configs_chat_template_serves_an_expert_without_one(zoo2, tmp_path):
    """`chat_template:` renders every expert's chats, so an expert whose tokenizer has no
    template of its own merges, as if its own were that one."""
    data = _chat_data(tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(zoo2["expert1"], bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for name in os.listdir(bare):
        if name.startswith("chat_template"):
            os.remove(bare / name)
    assert AutoTokenizer.from_pretrained(bare).chat_template is None
    cfg = com_config([{"model": zoo2["expert0"], "calibration": data},
                      {"model": str(bare), "calibration": data}])
    got = merge(dict(cfg, chat_template="chatml"), str(tmp_path / "named"))
    own = merge(com_config([{"model": with_template(zoo2[f"expert{i}"], tmp_path / f"own{i}", _chatml()),
                             "calibration": data} for i in range(2)]), str(tmp_path / "own"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[q], own[q])


def test_under_tokenizer_source_each_expert_renders_chats_with_its_own_template(zoo2, tmp_path):
    """The output tokenizer gives the token ids; each expert's chats are still rendered
    with its own template (docs/calibration.md), so with the vocabulary unchanged a
    tokenizer_source merges as the experts' own tokenizers do."""
    data = _chat_data(tmp_path)
    second = with_template(zoo2["expert1"], tmp_path / "chatml1", _chatml())
    cfg = com_config([{"model": zoo2["expert0"], "calibration": data},
                      {"model": second, "calibration": data}], base=zoo2["expert0"])
    own = merge(cfg, str(tmp_path / "own"))
    shared = merge(dict(cfg, tokenizer_source="base"), str(tmp_path / "base"))
    for name, value in own.items():
        assert_close(shared[name], value, name)


def test_under_tokenizer_source_an_expert_needs_no_tokenizer_of_its_own(zoo2, tmp_path):
    """As mergekit's other methods: with tokenizer_source the walk tokenizes every
    expert's data with the output tokenizer, so one without tokenizer files merges."""
    bare = tmp_path / "bare"
    shutil.copytree(zoo2["expert1"], bare)
    for name in os.listdir(bare):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(bare / name)
    cfg = pair(zoo2, str(bare), tokenizer_source="base")
    got = merge(cfg, str(tmp_path / "bare_out"))
    want = merge(pair(zoo2, zoo2["expert1"], tokenizer_source="base"), str(tmp_path / "want"))
    for name, value in want.items():
        assert_close(got[name], value, name)


def test_a_pad_token_past_the_embeddings_pads_with_a_row_that_exists(zoo2, tmp_path):
    """Padding is masked out, so a pad token added to the tokenizers but not to the
    models' embeddings changes nothing: the batches pad with id 0 instead."""
    experts = []
    for i in range(2):
        path = tmp_path / f"padded{i}"
        shutil.copytree(zoo2[f"expert{i}"], path)
        tok = AutoTokenizer.from_pretrained(path)
        tok.add_special_tokens({"pad_token": "<newpad>"})
        assert tok.pad_token_id >= pico.VOCAB
        tok.save_pretrained(path)
        experts.append({"model": str(path), "calibration": zoo2[f"expert{i}_data"]})
    got = merge(com_config(experts), str(tmp_path / "out"))
    want = merge(com_config([{"model": zoo2[f"expert{i}"], "calibration": zoo2[f"expert{i}_data"]}
                             for i in range(2)]), str(tmp_path / "want"))
    for name, value in want.items():
        assert_close(got[name], value, name)
