"""Three ways in (mergekit-yaml, the Python API, mergekit-com) and a normal output."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.support.merging import com_config, experts, merge, read_tensors

BIN = os.path.dirname(sys.executable)


def cli(name, *args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


@pytest.fixture(scope="module")
def com_yaml(zoo2, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "com.yml"
    path.write_text(yaml.safe_dump(com_config(experts(zoo2), base=zoo2["base"], alpha=0.8)))
    return str(path)


def test_three_entry_points_agree(com_yaml, tmp_path):
    cfg = yaml.safe_load(open(com_yaml))
    api = merge(cfg, str(tmp_path / "api"))
    r = cli("mergekit-yaml", com_yaml, str(tmp_path / "yaml"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("mergekit-com", com_yaml, str(tmp_path / "com"), "--quiet")
    assert r.returncode == 0, r.stderr
    for other in ("yaml", "com"):
        tensors = read_tensors(str(tmp_path / other))
        assert tensors.keys() == api.keys()
        for name in api:
            torch.testing.assert_close(tensors[name], api[name], rtol=1e-6, atol=0, msg=name)


def test_output_is_a_normal_model(com_yaml, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "out")
    merge(yaml.safe_load(open(com_yaml)), out)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "mergekit_config.yml",
            "tokenizer.json", "tokenizer_config.json"} <= files
    card = open(os.path.join(out, "README.md")).read()
    assert "Chain of Merges" in card and "chain_of_merges" in card
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("abc", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids["input_ids"].shape[1] + 5)


def ties_yaml(zoo, path):
    cfg = {
        "merge_method": "ties", "base_model": zoo["base"], "dtype": "float32",
        "models": [{"model": zoo[f"expert{i}"], "parameters": {"weight": 1.0, "density": 0.5}}
                   for i in range(2)],
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_other_methods_unchanged_by_the_package(zoo2, tmp_path):
    cfg = ties_yaml(zoo2, tmp_path / "ties.yml")
    on = cli("mergekit-yaml", cfg, str(tmp_path / "on"), "--quiet")
    off = cli("mergekit-yaml", cfg, str(tmp_path / "off"), "--quiet",
              env={"MERGEKIT_COM_AUTOLOAD": "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    a, b = read_tensors(str(tmp_path / "on")), read_tensors(str(tmp_path / "off"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autoload_registers_lazily_and_can_be_switched_off():
    code = ("import sys; import mergekit.merge_methods as mm; "
            "print('mergekit_com.integration.method' in sys.modules, "
            "'chain_of_merges' in [m.spec.name for m in mm.registered_methods()])")
    lazy = "import sys; print('mergekit' in sys.modules or 'mergekit_com.integration.method' in sys.modules)"
    run = lambda c, env=None: subprocess.run([sys.executable, "-c", c], capture_output=True,
                                             text=True, env=dict(os.environ, **(env or {})))
    assert run(lazy).stdout.split() == ["False"]  # nothing heavy at start-up
    assert run(code).stdout.split() == ["True", "True"]
    assert run(code, {"MERGEKIT_COM_AUTOLOAD": "0"}).stdout.split() == ["False", "False"]


@pytest.mark.parametrize("first", ["mergekit_com.integration.method", "mergekit_com.integration.planner",
                                   "mergekit_com.integration.chain_task", "mergekit.plan",
                                   "mergekit.merge_methods", "mergekit.merge", "mergekit_com"])
def test_any_import_order_registers_and_routes(first):
    code = (f"import {first}; import mergekit.merge_methods as mm, mergekit.plan as mp; "
            "print('chain_of_merges' in [m.spec.name for m in mm.registered_methods()], "
            "getattr(mp.MergePlanner.plan_to_disk, '_mergekit_com', False))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["True", "True"], r.stderr


def test_relative_calibration_paths_resolve_from_the_working_directory(zoo2, tmp_path, monkeypatch):
    import shutil

    shutil.copy(zoo2["expert0_data"], tmp_path / "e0.jsonl")
    shutil.copy(zoo2["expert1_data"], tmp_path / "e1.jsonl")
    monkeypatch.chdir(tmp_path)
    models = [{"model": zoo2["expert0"], "calibration": "e0.jsonl"},
              {"model": zoo2["expert1"], "calibration": "./e1.jsonl"}]
    relative = merge(com_config(models), "rel")
    absolute = merge(com_config(experts(zoo2)), str(tmp_path / "abs"))
    for name in absolute:
        torch.testing.assert_close(relative[name], absolute[name], rtol=0, atol=0)
