"""Same config, data and seed: bit-identical files on CPU, in one process or two."""

import os
import subprocess
import sys

import yaml

from mergekit_com import cli
from mergekit_com.io.publish import MARKER
from tests.support.merging import com_config, experts


def file_bytes(out):
    """The model's files; not the record of what was published (it holds file times)."""
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if f != MARKER}


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


def test_without_a_base_the_first_listed_model_gives_the_output_config(zoo2, tmp_path):
    """mergekit takes the output's config.json and tag-along files from its first
    referenced model, listed from a set: which one changed with the hash seed. Within a
    chain merge it is the first listed."""
    import json
    import shutil

    models = []
    for i, temperature in enumerate((0.5, 1.5)):
        path = tmp_path / f"e{i}"
        shutil.copytree(zoo2[f"expert{i}"], path)
        (path / "generation_config.json").write_text(json.dumps({"temperature": temperature,
                                                                 "do_sample": True}))
        models.append({"model": str(path), "calibration": zoo2[f"expert{i}_data"]})
    config = tmp_path / "com.yml"
    config.write_text(yaml.safe_dump(com_config(models)))
    for seed in ("1", "2", "3", "4"):
        out = tmp_path / f"out{seed}"
        r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-com"),
                            str(config), str(out), "--quiet"], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, PYTHONHASHSEED=seed))
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.5
