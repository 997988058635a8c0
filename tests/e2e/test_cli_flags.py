"""mergekit-yaml's flags parsed for real, all in one run (each start-up costs seconds)."""

import os
import subprocess
import sys

import torch
import yaml

from tests.support.merging import com_config, experts, merge, read_tensors

FLAGS = ["--lazy-unpickle", "--low-cpu-memory", "--out-shard-size", "20K", "--no-copy-tokenizer",
         "--no-write-model-card", "--random-seed", "3", "--trust-remote-code", "--device", "cpu",
         "--quiet", "-v"]


def test_mergekit_yaml_with_every_cpu_flag(zoo2, tmp_path):
    cfg = com_config(experts(zoo2))
    path = tmp_path / "com.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
                        str(path), str(out), *FLAGS],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = set(os.listdir(out))
    assert "model.safetensors.index.json" in files  # --out-shard-size
    assert not {"tokenizer.json", "README.md"} & files  # --no-copy-tokenizer, --no-write-model-card
    assert "com_report.json" in files
    assert "INFO:mergekit.chain_of_merges.walk:" in r.stderr  # -v reaches our logger
    assert "%|" not in r.stderr  # --quiet: no progress bars
    reference = merge(cfg, str(tmp_path / "api"))
    merged = read_tensors(str(out))
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_an_in_process_merge_runs_on_its_threads_and_leaves_the_callers(zoo2, tmp_path):
    """``--num-threads`` is the walk's; the process that called the merge keeps its own
    setting (a later merge or forward in it would otherwise run on the walk's)."""
    import json

    before = torch.get_num_threads()
    merge(com_config(experts(zoo2)), str(tmp_path / "out"), num_threads=before + 1)
    with open(tmp_path / "out" / "com_report.json") as f:
        assert json.load(f)["runtime"]["cpu_threads"] == before + 1
    assert torch.get_num_threads() == before


def test_an_unreadable_shard_size_is_one_line_before_anything_runs(zoo2, tmp_path, capsys):
    import pytest

    from mergekit_com.cli import main

    path = tmp_path / "com.yml"
    path.write_text(yaml.safe_dump(com_config(experts(zoo2))))
    for value in ("-1", "abc"):
        with pytest.raises(SystemExit) as e:
            main([str(path), str(tmp_path / "out"), "--out-shard-size", value, "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"mergekit-com: error: --out-shard-size '{value}' is not a size: give a whole "
                       "number of parameters, optionally with K, M or B (for example 500M)"]
    assert not (tmp_path / "out").exists()
