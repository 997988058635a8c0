"""Same config, data and seed: bit-identical files on CPU, in one process or two."""

import os
import subprocess
import sys

import yaml

from mergekit_com import cli
from tests.support.merging import com_config, experts


def file_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_same_inputs_give_identical_files(zoo2, tmp_path):
    cfg = com_config(experts(zoo2), base=zoo2["base"], objective="match_expert",
                     fallback="task_arithmetic")
    config = tmp_path / "com.yml"
    config.write_text(yaml.safe_dump(cfg))
    # same basename everywhere: mergekit's model card is named after it
    outs = [str(tmp_path / run / "merged") for run in ("first", "second", "other_process")]
    args = ["--quiet", "--random-seed", "7"]
    for out in outs[:2]:
        cli.main([str(config), out, *args])
    # another process, with another hash seed (dict and set orders may differ)
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-com"),
                        str(config), outs[2], *args], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONHASHSEED="12345"))
    assert r.returncode == 0, r.stderr
    first = file_bytes(outs[0])
    assert "model.safetensors" in first
    assert file_bytes(outs[1]) == first
    assert file_bytes(outs[2]) == first
