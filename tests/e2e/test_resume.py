"""Interrupted merges: nothing partial at out_path, resume gives the same model.

The kill tests start ``mergekit-com`` in a child process that stops at a
chosen point (a patch inside the child script only: the package has no test
hook), SIGKILL it there, and continue in this process.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

import mergekit_com.io.workdir as workdir
from mergekit_com import cli
from mergekit_com.io.report import REPORT_NAME
from mergekit_com.io.workdir import WorkDirError
from tests.support import pico
from tests.support.merging import (
    com_config,
    count_merged_layers,
    experts,
    merge,
    read_tensors,
)

LAYERS = 8


@pytest.fixture(scope="module")
def zoo8(tmp_path_factory):
    return pico.build_experts(str(tmp_path_factory.mktemp("zoo8")), n_experts=2, layers=LAYERS)


@pytest.fixture(scope="module")
def uninterrupted(zoo8, tmp_path_factory):
    """Reference merges (output folders), one per variant, run in one go."""
    root = tmp_path_factory.mktemp("reference")

    def reference(name, cfg):
        out = str(root / name)
        if not os.path.exists(out):
            merge(cfg, out)
        return out

    return reference


def assert_identical(actual, expected):
    """Same tensors, bit for bit, and the same merge report."""
    a, b = read_tensors(actual), read_tensors(expected)
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    report = [open(os.path.join(d, REPORT_NAME)).read() for d in (actual, expected)]
    assert report[0] == report[1]


def write_config(cfg, path):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


CHILD = textwrap.dedent("""
    import sys, time
    {patch}
    from mergekit_com.cli import main
    main(sys.argv[1:])
""")

STALL_AFTER_LAYER = """
import mergekit_com.io.workdir as w
_save = w.LayerCheckpoints.save
def save(self, key, *args):
    _save(self, key, *args)
    if key == 2:
        time.sleep(600)
w.LayerCheckpoints.save = save
"""

STALL_BEFORE_TOKENIZER = """
import mergekit.merge as m
def stall(*args, **kwargs):
    time.sleep(600)
m._copy_tokenizer = stall
"""


def kill_when(patch, args, ready, timeout=180):
    """Run mergekit-com with ``patch`` applied; SIGKILL it once ``ready()`` holds."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(patch=patch), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the merge ended early:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "the merge never got there"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_resume_equals_an_uninterrupted_merge(zoo8, uninterrupted, tmp_path,
                                                           monkeypatch):
    cfg = com_config(experts(zoo8))
    config = write_config(cfg, tmp_path / "com.yml")
    out = str(tmp_path / "merged")
    work = workdir.WorkDir(out)
    kill_when(STALL_AFTER_LAYER, [config, out, "--quiet"],
              ready=lambda: work.checkpoints.has(2))
    assert not os.path.exists(out), "a partial model appeared at out_path"
    assert work.checkpoints.completed_layers() == 3

    merged_layers = count_merged_layers(monkeypatch)
    cli.main([config, out, "--quiet", "--resume"])
    assert merged_layers == list(range(3, LAYERS)), "resume recomputed finished layers"
    assert not os.path.exists(work.path), "the work directory was not cleaned up"
    assert_identical(out, uninterrupted("module", cfg))


def test_killed_while_writing_leaves_no_output_and_rerun_finishes(zoo8, uninterrupted,
                                                                   tmp_path):
    cfg = com_config(experts(zoo8))
    config = write_config(cfg, tmp_path / "com.yml")
    out = str(tmp_path / "merged")
    work = workdir.WorkDir(out)
    # tensors and config are written; the tokenizer is next, then the model card
    kill_when(STALL_BEFORE_TOKENIZER, [config, out, "--quiet"],
              ready=lambda: os.path.exists(os.path.join(work.staged, "config.json")))
    assert os.path.exists(os.path.join(work.staged, "model.safetensors"))
    assert not os.path.exists(out), "a partial model appeared at out_path"
    cli.main([config, out, "--quiet"])  # the same command again
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= set(os.listdir(out))
    assert_identical(out, uninterrupted("module", cfg))


class Interrupt(BaseException):
    """Stands for Ctrl-C (KeyboardInterrupt) inside the walk."""


def interrupt_after_layer(monkeypatch, layer):
    original = workdir.LayerCheckpoints.save

    def save(self, key, *args):
        original(self, key, *args)
        if key == layer:
            raise Interrupt

    monkeypatch.setattr(workdir.LayerCheckpoints, "save", save)


@pytest.mark.parametrize("variant", [
    {"chain": "none"}, {"chain": "block"}, {"objective": "match_expert"},
])
def test_resume_is_identical_for_every_variant(zoo8, uninterrupted, tmp_path, monkeypatch,
                                               variant):
    # chain none / match_expert also rebuild the experts' own activations
    cfg = com_config(experts(zoo8), **variant)
    out = str(tmp_path / "out")
    with monkeypatch.context() as m:
        interrupt_after_layer(m, 4)
        with pytest.raises(Interrupt):
            merge(cfg, out)
    assert not os.path.exists(out)
    assert workdir.WorkDir(out).checkpoints.completed_layers() == 5
    merge(cfg, out)
    assert_identical(out, uninterrupted("-".join(variant.values()), cfg))


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_a_damaged_checkpoint_is_merged_again(zoo8, uninterrupted, tmp_path, monkeypatch,
                                              caplog, damage):
    cfg = com_config(experts(zoo8))
    out = str(tmp_path / "out")
    with monkeypatch.context() as m:
        interrupt_after_layer(m, 4)
        with pytest.raises(Interrupt):
            merge(cfg, out)
    layer2 = workdir.WorkDir(out).checkpoints._file(2)
    data = open(layer2, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one weight changed, the file still a valid safetensors file
        data = data[:-4] + bytes(4)
    open(layer2, "wb").write(data)
    merged_layers = count_merged_layers(monkeypatch)
    merge(cfg, out)
    assert "damaged" in caplog.text
    assert merged_layers == list(range(2, LAYERS)), "the damaged layer was not merged again"
    assert_identical(out, uninterrupted("module", cfg))


def test_a_changed_setup_is_refused(zoo8, tmp_path, monkeypatch):
    data = tmp_path / "e1.jsonl"
    data.write_bytes(open(zoo8["expert1_data"], "rb").read())
    models = [experts(zoo8)[0], {"model": zoo8["expert1"], "calibration": str(data)}]
    cfg = com_config(models)
    out = str(tmp_path / "out")
    with monkeypatch.context() as m:
        interrupt_after_layer(m, 1)
        with pytest.raises(Interrupt):
            merge(cfg, out)

    with pytest.raises(WorkDirError, match=r"different setup \(changed: merge configuration\)"):
        merge(com_config(models, alpha=0.5), out)
    with pytest.raises(WorkDirError, match=r"changed: merge configuration, model .*expert0"):
        merge(com_config([models[1], {**models[0], "model": zoo8["base"]}]), out)
    original = data.read_bytes()
    data.write_bytes(original + b'{"text": "one more record"}\n')
    with pytest.raises(WorkDirError, match=rf"changed: calibration data {re.escape(str(data))}\); "):
        merge(cfg, out)
    data.write_bytes(original)
    # expert0 replaced by another model of the same size, its times set back: the
    # fingerprint reads content, so the resume is refused all the same
    weights = os.path.join(zoo8["expert0"], "model.safetensors")
    mine, st = open(weights, "rb").read(), os.stat(weights)
    other = open(os.path.join(zoo8["expert1"], "model.safetensors"), "rb").read()
    assert len(other) == len(mine) and other != mine
    try:
        open(weights, "wb").write(other)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(weights).st_mtime_ns == st.st_mtime_ns
        with pytest.raises(WorkDirError, match=r"changed: model .*expert0\)"):
            merge(cfg, out)
    finally:
        open(weights, "wb").write(mine)
    assert workdir.WorkDir(out).checkpoints.completed_layers() == 2, "progress was lost"


def test_resume_flag_needs_something_to_resume(zoo8, tmp_path, capsys):
    config = write_config(com_config(experts(zoo8)), tmp_path / "com.yml")
    with pytest.raises(SystemExit) as e:
        cli.main([config, str(tmp_path / "out"), "--quiet", "--resume"])
    assert e.value.code == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


TORCHRUN_CHILD = textwrap.dedent("""
    import os, sys
    if os.environ.get("STOP_AFTER_LAYER"):
        import mergekit_com.io.workdir as w
        _save = w.LayerCheckpoints.save
        def save(self, key, *args):  # only rank 0 saves: it dies, torchrun ends rank 1
            _save(self, key, *args)
            if key == int(os.environ["STOP_AFTER_LAYER"]):
                os._exit(9)
        w.LayerCheckpoints.save = save
    if os.environ.get("STOP_BEFORE_PUBLISH"):  # finished, not published: rank 0 dies there
        import mergekit_com.io.workdir as w
        def publish(self):
            os._exit(9)
        w.WorkDir.publish = publish
    from mergekit_com.cli import main
    main(sys.argv[1:])
""")


@pytest.mark.slow
def test_two_rank_merge_resumes_from_rank0_checkpoints(zoo8, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(TORCHRUN_CHILD)
    # one record per batch (the budget is batch_size x max_seq_len tokens): 12 batches, 6 a rank
    config = write_config(com_config(experts(zoo8), batch_size=1, max_seq_len=32), tmp_path / "com.yml")

    def torchrun(out, port, *extra, stop=None, unpublished=False):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if stop is not None:
            env["STOP_AFTER_LAYER"] = str(stop)
        if unpublished:
            env["STOP_BEFORE_PUBLISH"] = "1"
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                               "2", "--master_port", str(port), str(script), config, out,
                               "--quiet", *extra], capture_output=True, text=True, env=env,
                              timeout=600)

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = torchrun(full, 29611)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torchrun(part, 29612, stop=3).returncode != 0
    assert not os.path.exists(part)
    assert workdir.WorkDir(part).checkpoints.completed_layers() == 4
    r = torchrun(part, 29613, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_identical(part, full)
    assert sorted(os.listdir(tmp_path)) == ["child.py", "com.yml", "full", "part"]
    # finished but not published: rank 0 publishes it and the other rank leaves at once
    # (it waited for a walk rank 0 never started, until the process group's timeout)
    late = str(tmp_path / "late")
    assert torchrun(late, 29614, unpublished=True).returncode != 0
    assert workdir.WorkDir(late).is_complete() and not os.path.exists(late)
    r = torchrun(late, 29615)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_identical(late, full)
