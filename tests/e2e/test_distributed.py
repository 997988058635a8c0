"""Data-parallel calibration: 2 gloo ranks under torchrun merge like 1 process, write once."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from mergekit_com.method import distributed
from tests.support.merging import com_config, experts, merge, read_tensors

# Count every finalize of mergekit's tensor writer, with the rank that did it.
CHILD = textwrap.dedent("""
    import os, sys
    from mergekit.io.tensor_writer import TensorWriter
    _finalize = TensorWriter.finalize
    def finalize(self):
        with open(os.environ["WRITES_LOG"], "a") as f:
            f.write(os.environ["RANK"] + "\\n")
        _finalize(self)
    TensorWriter.finalize = finalize
    from mergekit_com.cli import main
    main(sys.argv[1:])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_and_write_once(zoo2, tmp_path):
    # several batches per expert, so that each rank gets a share: 2 x 24 tokens each; the
    # defaults (blend: auto's held-out folds, alpha: auto's spread) are summed over ranks too
    cfg = com_config(experts(zoo2), defaults=True, batch_size=2, max_seq_len=24)
    single = merge(cfg, str(tmp_path / "single"))
    (tmp_path / "com.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "child.py").write_text(CHILD)
    out = tmp_path / "runs" / "ranks2"
    env = dict(os.environ, OMP_NUM_THREADS="1", WRITES_LOG=str(tmp_path / "writes.log"))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(tmp_path / "child.py"), str(tmp_path / "com.yml"), str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sharded = read_tensors(str(out))
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6)
    # the report's covariate shift is summed over both ranks' tokens, not rank 0's share
    ref = json.loads((tmp_path / "single" / "com_report.json").read_text())["layers"]
    got = json.loads((out / "com_report.json").read_text())["layers"]
    for a, b in zip(got, ref):
        assert a["covariate_shift"] == pytest.approx(b["covariate_shift"], rel=1e-5, abs=1e-9)
        for linear, shares in b["blend"].items():  # the same shares and shrinkage as one process
            assert a["blend"][linear] == pytest.approx(shares, abs=1e-6)
        for linear, alphas in b["alpha"].items():
            assert a["alpha"][linear] == pytest.approx(alphas, abs=1e-6)
    # written once, by rank 0; rank 1's scratch output is gone
    assert (tmp_path / "writes.log").read_text().split() == ["0"]
    assert os.listdir(tmp_path / "runs") == ["ranks2"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "single"))


def test_shards_are_disjoint_and_cover_every_sample(monkeypatch):
    samples = list(range(11))
    monkeypatch.setenv("WORLD_SIZE", "3")
    parts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        parts.append(distributed.shard(samples, "expert x"))
    assert sorted(sum(parts, [])) == samples and [len(p) for p in parts] == [4, 4, 3]
    with pytest.raises(ValueError, match="expert y has 2 batches, fewer than the 3 ranks"):
        distributed.shard([1, 2], "expert y")


def test_single_process_is_untouched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched() and distributed.is_writer()
    assert distributed.shard([1, 2, 3], "x") == [1, 2, 3]
