"""The work directory on its own: checkpoints, the manifest check, publishing."""

import json
import os

import pytest
import torch

from mergekit_com.io.workdir import (
    LayerCheckpoints,
    WorkDir,
    WorkDirError,
    describe_changes,
    model_stamp,
)


def test_checkpoints_keep_names_order_dtypes_and_the_report(tmp_path):
    ck = LayerCheckpoints(str(tmp_path / "layers"))
    written = [("b.weight", torch.randn(3, 2).bfloat16()), ("a.bias", torch.arange(3.0))]
    ck.save(0, written, {"shift": [[1.0, 2.0]]})
    got, report = ck.load(0)
    assert [n for n, _ in got] == ["b.weight", "a.bias"]
    for (_, want), (_, have) in zip(written, got):
        assert have.dtype == want.dtype and torch.equal(have, want)
    assert report == {"shift": [[1.0, 2.0]]}


def test_completed_layers_is_the_unbroken_prefix_after_pre(tmp_path):
    ck = LayerCheckpoints(str(tmp_path))
    t = [("x", torch.zeros(1))]
    ck.save(0, t)
    assert ck.completed_layers() == 0  # no "pre": nothing can be resumed
    ck.save("pre", t)
    ck.save(1, t)
    ck.save(3, t)
    assert ck.completed_layers() == 2
    (tmp_path / "layer-00002.safetensors.tmp").write_bytes(b"partial")  # an interrupted save
    assert ck.completed_layers() == 2


def test_a_changed_setup_is_refused_naming_what_changed(tmp_path):
    out = str(tmp_path / "merged")
    stamp = {"format": 2, "config": "c1", "models": {"m": "s1"}, "calibration": {"d.jsonl": "h1"}}
    WorkDir(out).open(stamp, resume_only=False)
    assert json.load(open(os.path.join(out + ".com-work", "manifest.json")))["fingerprint"] == stamp
    changed = {**stamp, "models": {"m": "s2"}, "calibration": {"d.jsonl": "h2"}}
    with pytest.raises(WorkDirError, match=r"changed: model m, calibration data d.jsonl"):
        WorkDir(out).open(changed, resume_only=False)
    assert describe_changes(stamp, {**stamp, "config": "c2"}) == ["merge configuration"]


def test_resume_only_needs_a_work_directory(tmp_path):
    with pytest.raises(WorkDirError, match="nothing to resume"):
        WorkDir(str(tmp_path / "merged")).open({}, resume_only=True)
    assert not os.path.exists(tmp_path / "merged.com-work")


def test_publish_swaps_in_the_new_model_and_keeps_other_files(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_text("old")
    work = WorkDir(str(out)).open({}, resume_only=False)
    os.makedirs(work.staged)
    open(os.path.join(work.staged, "model.safetensors"), "w").write("new")
    work.publish()
    assert (out / "model.safetensors").read_text() == "new"
    assert (out / "notes.txt").read_text() == "mine"


def test_model_stamp_changes_with_a_files_size(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"1234")
    before = model_stamp(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"12345")
    assert model_stamp(str(tmp_path)) != before
