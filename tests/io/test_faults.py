"""Every filesystem step of a merge's resume and publish, failed in every way.

A merge is driven through ``WorkDir.complete_and_publish`` (the code
``staged_merge`` runs) with a stand-in for mergekit's writing: checkpoints
for the embeddings and three layers, then the staged model built from them.
For each layout of ``out_path`` a clean run records its steps (mkdir, link,
copy, rename, unlink, rmdir, fsyncs, file and checkpoint writes); then each
step in turn fails with each fault of ``tests/support/faults.py``. After
the fault (and, for a kill, after the next run's recovery), ``out_path``
must read as the previous one or as the complete new merge, nothing else;
the next run must then finish the merge; and every entry that was not ours
must still be there, the same file (inode, time, content) as before.
The total is stated in docs/errors.md.
"""

import json
import os
import pathlib
import re
import tempfile

import pytest
import torch

from mergekit_com.io import fsops, publish
from mergekit_com.io.workdir import WorkDir
from tests.support.faults import FAULTS, FaultyFS, Killed, contents, snapshot
from tests.support.paths import DOCS

LAYERS = 3
STAMP = {"format": 3, "config": "c"}
NEW_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def build(work: WorkDir) -> None:
    """What mergekit does in a merge, reduced to its file writes: checkpoint each step
    (resuming after the saved ones), then write the staged model from the checkpoints."""
    ck = work.checkpoints
    done = ck.completed_layers()
    if done == 0:
        ck.save("pre", [("embed", torch.arange(4.0))], None)
    for i in range(done, LAYERS):
        ck.save(i, [(f"layer{i}", torch.full((3,), float(i)))], {"i": i})
    tensors = [t for key in ["pre", *range(LAYERS)] for _, t in ck.load(key)[0]]
    os.makedirs(work.staged, exist_ok=True)  # as mergekit's writer does
    weights = b"".join(t.numpy().tobytes() for t in tensors)
    for name, data in zip(NEW_FILES, (b'{"new": 1}', weights, b"{}")):
        fsops.write_bytes(os.path.join(work.staged, name), data)


def expected_weights() -> bytes:
    tensors = [torch.arange(4.0)] + [torch.full((3,), float(i)) for i in range(LAYERS)]
    return b"".join(t.numpy().tobytes() for t in tensors)


def run_merge(out: str) -> None:
    work = WorkDir(out)
    work.recover()
    work.open(STAMP, resume_only=False)
    work.complete_and_publish(lambda: build(work))


def previous_merge(target: str) -> None:
    """A merge published earlier, sharded in two, plus someone else's files."""
    os.makedirs(os.path.join(target, "data"))
    old = {"model-00001-of-00002.safetensors": b"old1", "model-00002-of-00002.safetensors": b"old2",
           "model.safetensors.index.json": b'{"weight_map": {}}', "config.json": b'{"old": 1}'}
    for name, data in old.items():
        open(os.path.join(target, name), "wb").write(data)
    open(os.path.join(target, publish.MARKER), "wb").write(publish.marker_bytes(target, old))
    open(os.path.join(target, "notes.txt"), "w").write("the user's notes")
    open(os.path.join(target, "data", "keep.csv"), "w").write("1,2\n")
    os.symlink("notes.txt", os.path.join(target, "notes.link"))


def layout(kind: str, root: str, monkeypatch) -> str:
    """Builds ``out_path`` as ``kind``; returns the out_path to merge into."""
    out = os.path.join(root, "merged")
    if kind == "empty":
        os.makedirs(out)
    elif kind in ("used", "mount"):
        previous_merge(out)
    elif kind == "symlink":
        previous_merge(os.path.join(root, "real"))
        os.symlink("real", out)
    if kind == "mount":  # rename(2) of out_path itself would fail; the work goes inside it
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: p == out or real_ismount(p))
        os.makedirs(os.path.join(out, "lost+found"))
    return out


def foreign(snap):
    return {k: v for k, v in snap.items()
            if k.split(os.sep)[-1] in ("notes.txt", "keep.csv", "notes.link", "data", "lost+found")}


def new_merge(before):
    """What out_path must hold after the merge: the others' entries and the new model."""
    out = contents(foreign(before))
    out.update({"config.json": ("file",), "model.safetensors": ("file",),
                "tokenizer.json": ("file",), publish.MARKER: ("file",)})
    return out


def reads_as(snap, before) -> str:
    seen = contents(snap)
    if seen == contents(before):
        return "previous"
    shape = {k: v[:1] if k in NEW_FILES or k == publish.MARKER else v for k, v in seen.items()}
    if shape == new_merge(before) and _is_complete(snap):
        return "new"
    return "mixed"


def _is_complete(snap) -> bool:
    return all(k in snap for k in NEW_FILES)


def check_new(target: str, before) -> None:
    assert reads_as(view(target), before) == "new"
    assert not any(os.path.lexists(os.path.join(target, n))
                   for n in (publish.TRANSACTION, publish.DONE))
    assert open(os.path.join(target, "model.safetensors"), "rb").read() == expected_weights()
    marker = json.load(open(os.path.join(target, publish.MARKER)))
    assert sorted(marker["files"]) == sorted(NEW_FILES)


def out_root(out: str) -> str:
    return os.path.realpath(out)


OURS_INSIDE = (".com-work", ".com-work.lock", ".com-work.new", ".com-work.old")  # a mounted out_path's work


def view(target: str):
    """out_path as a reader sees it: our work folders hidden, and a committed
    transaction's leftovers too (the next run removes them)."""
    committed = os.path.exists(os.path.join(target, publish.TRANSACTION, publish.COMMITTED))
    hidden = OURS_INSIDE + (publish.DONE,) + ((publish.TRANSACTION,) if committed else ())
    return snapshot(target, skip=hidden)


KINDS = ("new", "empty", "used", "mount", "symlink")


def clean_steps(kind, tmp_path, monkeypatch):
    root = str(tmp_path / "clean")
    os.makedirs(root)
    out = layout(kind, root, monkeypatch)
    fs = FaultyFS(monkeypatch)
    run_merge(out)
    return fs.steps


@pytest.fixture
def fast_tmp(tmp_path):
    """Thousands of small runs: on a RAM disk where there is one."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            yield pathlib.Path(d)
    else:
        yield tmp_path


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_survives_every_fault(kind, fast_tmp, monkeypatch):
    tmp_path = fast_tmp
    steps = clean_steps(kind, tmp_path, monkeypatch)
    assert {name for name, _ in steps} >= {"mkdir", "rename", "fsync_file", "fsync_dir",
                                            "write_bytes", "save_tensors", "unlink"}
    failures = []
    for at in range(1, len(steps) + 1):
        for fault in FAULTS:
            root = str(tmp_path / f"{at}-{fault}")
            os.makedirs(root)
            try:
                problem = _one(kind, root, at, fault, monkeypatch)
            except AssertionError as e:
                problem = str(e).splitlines()[0]
            if problem:
                failures.append(f"step {at} ({steps[at - 1][0]} {steps[at - 1][1]}), {fault}: "
                                f"{problem}")
    assert not failures, "\n".join(failures[:20])


def _one(kind, root, at, fault, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)  # the step is counted all the same; no disk wait
        out = layout(kind, root, m)
        target = out_root(out)
        parent_before = sorted(os.listdir(root))
        before = view(target)
        fs = FaultyFS(m, at, fault)
        try:
            run_merge(out)
        except (OSError, Killed):
            pass
        if fault != "kill":
            state = reads_as(view(target), before)
            if state == "mixed":
                return f"out_path is {sorted(contents(view(target)))} after the error"
        fs.off()
        WorkDir(out).recover()  # what the next run does first, under the lock
        if reads_as(view(target), before) == "mixed":
            return f"out_path is {sorted(contents(view(target)))} after recovery"
        if foreign(view(target)) != foreign(before):
            return "someone else's file was moved, changed or removed"
        run_merge(out)  # the same command again finishes the merge
        check_new(target, before)
        if foreign(view(target)) != foreign(before):
            return "someone else's file was moved, changed or removed"
        if set(os.listdir(root)) - {"merged"} != set(parent_before) - {"merged"}:
            return f"left behind next to out_path: {sorted(os.listdir(root))}"
    return None


def test_a_bad_checkpoint_is_discarded_and_recomputed(tmp_path, caplog):
    out = str(tmp_path / "merged")
    work = WorkDir(out).open(STAMP, resume_only=False)
    build(work)
    layer1 = work.checkpoints._file(1)
    data = bytearray(open(layer1, "rb").read())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float of layer 1 altered
    open(layer1, "wb").write(bytes(data))
    fresh = WorkDir(out)
    assert fresh.checkpoints.completed_layers() == 1  # pre and layer 0 are sound
    assert "damaged" in caplog.text and not os.path.exists(layer1)
    open(work.checkpoints._file(0), "wb").write(b"truncated")
    assert WorkDir(out).checkpoints.completed_layers() == 0
    fresh = WorkDir(out)
    fresh.complete_and_publish(lambda: build(fresh))
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == expected_weights()


def test_a_changed_staged_model_is_written_again(tmp_path):
    out = str(tmp_path / "merged")
    work = WorkDir(out).open(STAMP, resume_only=False)
    build(work)
    work.mark_complete()
    open(os.path.join(work.staged, "model.safetensors"), "wb").write(b"tampered")
    again = WorkDir(out)
    again.complete_and_publish(lambda: build(again))
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == expected_weights()


@pytest.mark.parametrize("rerun_with", [{"out_shard_size": 1000}, {"out_shard_size": 50}])
def test_a_finished_merge_is_written_again_only_with_other_output_options(tmp_path, caplog,
                                                                         rerun_with):
    """Finished but not published (a kill, a blocked out_path), then run again: with the
    same output options it is published as it is; with others (--out-shard-size, ...) the
    staged model is written again from the layer checkpoints, with a warning."""
    out = str(tmp_path / "merged")
    work = WorkDir(out).open(STAMP, resume_only=False)
    build(work)
    work.mark_complete({"out_shard_size": 1000})
    builds = []
    again = WorkDir(out)
    again.complete_and_publish(lambda: (builds.append(1), build(again)), written_with=rerun_with)
    changed = rerun_with["out_shard_size"] != 1000
    assert builds == ([1] if changed else [])
    assert ("written with other output options (changed: out_shard_size)" in caplog.text) == changed
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == expected_weights()


def test_a_finished_merge_recorded_without_its_output_options_is_published_as_it_is(tmp_path,
                                                                                     caplog):
    """A `complete` record of the files alone (as versions before the output options wrote
    it) is read as such: the staged model is intact, so it is published, not written again."""
    out = str(tmp_path / "merged")
    work = WorkDir(out).open(STAMP, resume_only=False)
    build(work)
    work.mark_complete({"out_shard_size": 1})
    record = os.path.join(work.path, "complete")
    files = json.load(open(record))["files"]
    open(record, "w").write(json.dumps(files))
    builds = []
    again = WorkDir(out)
    again.complete_and_publish(lambda: (builds.append(1), build(again)), written_with={"x": 2})
    assert builds == [] and "written again" not in caplog.text and "changed" not in caplog.text
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == expected_weights()


@pytest.mark.parametrize("lost", ["out_path", "a file"])
def test_a_published_merge_gone_from_out_path_is_written_again(tmp_path, caplog, lost):
    """Published, then killed before its work directory was removed; out_path deleted
    meanwhile (or one of its files, the marker left): the next run writes the model again
    from the checkpoints and publishes it, instead of reporting success without it."""
    import shutil

    out = str(tmp_path / "merged")
    work = WorkDir(out).open(STAMP, resume_only=False)
    build(work)
    work.mark_complete()
    work.publish()
    assert not os.path.isdir(work.staged) and work.is_published()
    if lost == "out_path":
        shutil.rmtree(out)
    else:
        os.unlink(os.path.join(out, "model.safetensors"))
    again = WorkDir(out)
    again.complete_and_publish(lambda: build(again))
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == expected_weights()
    assert "which no longer holds it" in caplog.text and not os.path.exists(again.path)


def total_steps(tmp_path, monkeypatch) -> int:
    total = 0
    for kind in KINDS:
        with monkeypatch.context() as m:
            total += len(clean_steps(kind, tmp_path / kind, m))
    return total


def test_docs_state_the_count(tmp_path, monkeypatch):
    text = open(os.path.join(DOCS, "errors.md"), encoding="utf-8").read()
    found = re.search(r"(\d+) steps x (\d+) faults, all survived", text)
    assert found, "docs/errors.md states the fault-injection count"
    assert (int(found.group(1)), int(found.group(2))) == (total_steps(tmp_path, monkeypatch),
                                                          len(FAULTS))
