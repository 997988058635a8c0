"""What a merge may do to out_path, through the real command.

* A used out_path never loads as a stale mix (a previous merge sharded
  differently leaves no shard or index behind).
* A second merge into a live one stops at once and leaves it untouched.
* A filesystem mounted inside out_path is never emptied (finding 1 of issue 11).
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from mergekit_com.io.workdir import WorkDir
from tests.support.bad_inputs import can_mount
from tests.support.faults import snapshot
from tests.support.merging import com_config, experts, merge, read_tensors, run_cli


def test_a_used_out_path_loads_exactly_the_new_merge(zoo2, tmp_path):
    from transformers import AutoModelForCausalLM

    out, reference = str(tmp_path / "merged"), str(tmp_path / "reference")
    merge(com_config(experts(zoo2), alpha=0.5), out, out_shard_size=20_000)
    sharded = set(os.listdir(out))
    assert "model.safetensors.index.json" in sharded and len(
        [f for f in sharded if f.endswith(".safetensors")]) > 1
    new = merge(com_config(experts(zoo2), alpha=0.9), out)  # one file this time
    want = merge(com_config(experts(zoo2), alpha=0.9), reference)
    files = set(os.listdir(out))
    assert not {f for f in files if f.startswith("model-") or f.endswith(".index.json")}, files
    assert all(torch.equal(new[k], want[k]) for k in want)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in want.items():
        assert torch.equal(loaded[name], tensor), name


STALL = textwrap.dedent("""
    import sys, time
    import mergekit_com.io.checkpoints as c
    _save = c.LayerCheckpoints.save
    def save(self, key, *args):
        _save(self, key, *args)
        if key == 0:
            open(sys.argv[-1] + ".stalled", "w").close()
            time.sleep(600)
    c.LayerCheckpoints.save = save
    from mergekit_com.cli import main
    main(sys.argv[1:-1])
""")


def test_a_second_merge_stops_at_once_and_leaves_the_first_alone(zoo2, tmp_path, capsys):
    config = tmp_path / "com.yml"
    config.write_text(yaml.safe_dump(com_config(experts(zoo2))))
    out = str(tmp_path / "merged")
    work = WorkDir(out)
    first = subprocess.Popen([sys.executable, "-c", STALL, str(config), out, "--quiet",
                              str(tmp_path / "first")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(tmp_path / "first.stalled"):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        live = snapshot(work.path)
        capsys.readouterr()
        assert run_cli([str(config), out, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"being merged by another process (pid {first.pid} on host" \
            in err[0], err
        assert snapshot(work.path) == live, "the second merge touched the live one's work"
        assert not os.path.exists(out)
    finally:
        first.kill()
        first.wait()
    assert run_cli([str(config), out, "--quiet"]) == 0  # the dead holder blocks nothing
    assert read_tensors(out)


@pytest.mark.skipif(not can_mount(), reason="no unprivileged mount namespace (unshare -rm)")
def test_a_filesystem_mounted_inside_out_path_is_never_emptied(zoo2, tmp_path):
    config = tmp_path / "com.yml"
    config.write_text(yaml.safe_dump(com_config(experts(zoo2), num_samples=12)))
    out = tmp_path / "merged"
    merge(com_config(experts(zoo2), num_samples=12), str(out))  # a previous merge there
    (out / "data").mkdir()
    command = f"{sys.executable} -m mergekit_com.cli {config} {out} --quiet"
    script = (f"mount -t tmpfs tmpfs {out}/data && echo precious > {out}/data/keep.txt && "
              f"{command} && cat {out}/data/keep.txt && ls -A {out}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "precious" and "model.safetensors" in lines and "data" in lines
