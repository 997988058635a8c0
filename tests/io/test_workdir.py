"""The work directory on its own: checkpoints, the manifest check, publishing."""

import json
import os

import pytest
import torch

from mergekit_com.io.checkpoints import LayerCheckpoints
from mergekit_com.io.fingerprint import describe_changes
from mergekit_com.io.workdir import WorkDir, WorkDirError


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


@pytest.mark.parametrize("manifest", ["[1]", '{"notes": "mine"}', '{"fingerprint": 3}'])
def test_a_folder_named_like_a_work_directory_but_not_one_is_left_alone(tmp_path, manifest):
    """Someone else's out.com-work (its manifest.json not ours) is never taken for an
    interrupted merge, whose message would invite deleting it."""
    work = tmp_path / "merged.com-work"
    work.mkdir()
    (work / "manifest.json").write_text(manifest)
    (work / "precious.txt").write_text("keep")
    with pytest.raises(WorkDirError, match=r"exists but is not a mergekit-com work directory"):
        WorkDir(str(tmp_path / "merged")).open({"format": 2}, resume_only=False)
    assert (work / "precious.txt").read_text() == "keep"


def test_resume_only_needs_a_work_directory(tmp_path):
    with pytest.raises(WorkDirError, match="nothing to resume"):
        WorkDir(str(tmp_path / "merged")).open({}, resume_only=True)
    assert not os.path.exists(tmp_path / "merged.com-work")




@pytest.mark.parametrize("name", [".com-publish", ".com-publish.done"])
def test_a_folder_of_someone_elses_named_like_a_publish_is_never_touched(tmp_path, name):
    from mergekit_com.io import publish

    target, staged = tmp_path / "merged", tmp_path / "staged"
    (target / name).mkdir(parents=True)
    (target / name / "mine.txt").write_text("the user's")
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    publish.recover(str(target))  # a leftover transaction would be finished or undone here
    assert (target / name / "mine.txt").read_text() == "the user's"
    assert publish.blocking_files(str(target)) == [name]
    with pytest.raises(publish.PublishBlocked):
        publish.publish(str(staged), str(target))
    assert (target / name / "mine.txt").read_text() == "the user's"
    assert not (target / "config.json").exists()
