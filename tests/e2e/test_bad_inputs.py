"""Every row of docs/errors.md's "What happens when..." table, run through mergekit-com.

A case that stops must exit 2 with exactly one line, ``mergekit-com: error:``
and the documented message, create neither out_path nor a work directory, and
run before any layer is merged. A case that merges must log the documented
warning and produce the model.
"""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from mergekit_com import cli
from mergekit_com.errors import ChainConfigError
from mergekit_com.io.workdir import WorkDir
from tests.support.bad_inputs import (
    CASES,
    Case,
    World,
    can_mount,
    cli_args,
    documented_rows,
    normalized,
    run_in_mount,
)
from tests.support.faults import snapshot
from tests.support.merging import count_merged_layers, read_tensors, run_cli

MOUNTS_OK = can_mount()


@pytest.fixture(scope="module")
def world(zoo2, tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("bad_inputs")), zoo2)


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.chdir(world.root)
    world.merged_layers = count_merged_layers(monkeypatch)
    return world


def test_docs_list_every_case_and_nothing_else():
    assert set(documented_rows()) == set(CASES)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_case_behaves_as_the_docs_say(in_world, case_id, capsys, caplog, monkeypatch):
    world, case = in_world, CASES[case_id]
    outcome, message = documented_rows()[case_id]
    args = cli_args(world, case)
    before = world.prepare_out(case)
    out = world.path(case.out_path)
    out_before = snapshot(out)
    if case.mount:
        if not MOUNTS_OK:
            pytest.skip("no unprivileged mount namespace here (unshare -rm)")
        _mounted_case_behaves(world, case, outcome, message)
        return
    capsys.readouterr()  # building the inputs prints progress bars
    caplog.set_level(logging.WARNING)
    with _circumstances(world, case, monkeypatch):
        code = run_cli(args)
    err = capsys.readouterr().err
    kept = os.path.exists(out + ".com-work")
    assert kept == (case.code != 2), "the work directory is left behind, or not kept"
    if outcome == "stops":
        lines = err.strip().splitlines()
        assert code == case.code and len(lines) == 1, err
        assert lines[0].startswith("mergekit-com: error: "), err
        actual = normalized(lines[0].removeprefix("mergekit-com: error: "), world)
        assert actual == message, f"README row for case {case_id} should read:\n{actual}"
        assert snapshot(out) == out_before, "out_path was created or changed"
        if case.code == 2:
            assert world.merged_layers == [], "a layer was merged before the error"
    else:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert code == 0, err
        assert message in warnings, f"case {case_id} warned:\n" + "\n".join(warnings)
        assert all(torch.isfinite(t).all() for t in read_tensors(out).values())
        for name, data in before.items():  # someone else's files stay as they were
            assert open(os.path.join(out, name), "rb").read() == data


class _Terminate(Exception):
    pass


def _circumstances(world, case, monkeypatch):
    """What a case needs around the command: a merge holding out_path, a SIGTERM."""
    import contextlib

    @contextlib.contextmanager
    def held():
        if case.id == "w1":  # another merge holds out_path's lock
            with WorkDir(world.path(case.out_path)).lock():
                yield
        elif case.id == "s1":  # SIGTERM, as docker stop sends, after the first layer
            import mergekit_com.io.checkpoints as ck

            original = ck.LayerCheckpoints.save

            def save(self, key, *a):
                original(self, key, *a)
                if key == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

            with monkeypatch.context() as m:
                m.setattr(ck.LayerCheckpoints, "save", save)
                yield
        else:
            yield

    return held()


def _mounted_case_behaves(world, case, outcome, message):
    """The case in a child process, with its filesystem mounted (then gone with the child)."""
    r = run_in_mount(world, case, cli_args(world, case))
    lines = r.stderr.strip().splitlines()
    if outcome == "stops":
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        actual = normalized(lines[0].removeprefix("mergekit-com: error: "), world)
        assert actual == message, f"README row for case {case.id} should read:\n{actual}"
        assert ".com-work" not in r.stdout, "a work directory was left on the mounted disk"
    else:
        assert r.returncode == 0, r.stderr
        listed = r.stdout.split()
        assert {"config.json", "model.safetensors"} <= set(listed), r.stdout
        assert not any(n.startswith(".com-") for n in listed), r.stdout


def test_sigterm_stops_cleanly_and_the_same_command_continues(in_world, monkeypatch):
    world, case = in_world, Case("s1-again")
    with _circumstances(world, CASES["s1"], monkeypatch):
        assert run_cli(cli_args(world, case)) == 143
    work = WorkDir(world.path(case.out_path))
    assert work.checkpoints.completed_layers() == 1, "the merge so far was not kept"
    assert not os.path.exists(work.path + ".lock"), "the lock outlived the merge"
    assert run_cli(cli_args(world, case)) == 0
    assert world.merged_layers == [0, 1], "the continued merge redid a layer"


def test_jsonl_errors_name_the_line(in_world):
    for case_id, line in (("3", "line 2"), ("4", "line 3")):
        assert f": {line} " in documented_rows()[case_id][1]


def test_verbose_shows_the_traceback(in_world):
    with pytest.raises(ChainConfigError, match="did you mean 'alpha'"):
        cli.main(cli_args(in_world, CASES["9"], "-v"))


def test_plain_mergekit_yaml_prints_one_clean_line(world):
    case = CASES["1"]
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
                        *cli_args(world, case)], cwd=world.root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"Error: {documented_rows()['1'][1]}" in r.stderr.splitlines()
    assert not os.path.exists(world.path(case.out_path))


def _merge(world, case: Case) -> str:
    out = world.path(case.out_path)
    if not os.path.exists(out):  # the parametrized test may have made it
        assert run_cli(cli_args(world, case)) == 0
    return out


def test_num_samples_beyond_the_file_uses_every_record(in_world):
    # case 8: num_samples 50 on 12 records is the same merge as num_samples 12
    more = read_tensors(_merge(in_world, CASES["8"]))
    exact = read_tensors(_merge(in_world, Case("8-exact", params={"num_samples": 12})))
    assert all(torch.equal(more[k], exact[k]) for k in exact)


def test_rank_deficient_gram_is_regularised_not_nan(in_world, caplog):
    # case 14 for both experts: 3 tokens for 32/64 input features, no ridge,
    # no shrinkage: even the summed Gram is singular
    caplog.set_level(logging.WARNING)
    both = Case("14-both", calibration="tiny.jsonl", first_calibration="tiny.jsonl",
                params={"ridge": 0.0, "alpha": 1.0})
    tensors = read_tensors(_merge(in_world, both))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any("raising the ridge" in r.getMessage() for r in caplog.records)


def test_someone_elses_files_in_out_path_are_never_touched(in_world):
    # case 15b: unrelated files stay, the same files; case 15: the merge does not start
    world = in_world
    case = CASES["15b"]
    out = world.path(case.out_path)
    world.prepare_out(case)
    notes = os.stat(os.path.join(out, "notes.txt"))
    failing = Case("15-fail", expert="expert_nan", out=case.out_path)
    assert run_cli(cli_args(world, failing)) == 2
    assert run_cli(cli_args(world, case)) == 0
    after = os.stat(os.path.join(out, "notes.txt"))
    assert (after.st_ino, after.st_mtime_ns) == (notes.st_ino, notes.st_mtime_ns)
    assert "model.safetensors" in os.listdir(out)


def test_remote_code_is_never_run(in_world):
    assert run_cli(cli_args(in_world, CASES["16"])) == 2
    assert not os.path.exists(in_world.marker)


def test_malicious_pickle_is_refused_without_running_it(in_world, monkeypatch, capsys):
    world = in_world
    world.ensure("expert_evil")
    evil = world.path("expert_evil/pytorch_model.bin")
    # the payload is real: an ordinary unpickling runs it
    torch.load(evil, weights_only=False)
    assert os.path.exists(world.marker)
    os.remove(world.marker)
    # Alone (no other model to compare shapes with) and where the environment
    # turns torch's weights-only default off, as mergekit's own loader would.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    alone = Case("17-alone", expert="expert_evil", first_calibration=None)
    capsys.readouterr()
    assert run_cli(cli_args(world, alone)) == 2
    assert "holds pickled objects other than tensors" in capsys.readouterr().err
    assert not os.path.exists(world.marker)


def test_plain_pickled_checkpoint_merges_like_safetensors(in_world):
    world = in_world
    world.ensure("expert_bin")
    reference = read_tensors(_merge(world, CASES["8"]))
    binary = Case("bin", expert="expert_bin", params={"num_samples": 50})
    assert run_cli(cli_args(world, binary)) == 0
    merged = read_tensors(world.path(binary.out_path))
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_a_stopped_merge_removes_the_folders_it_made_for_out_path(in_world, capsys):
    world = in_world
    case = Case("new-folders", calibration="missing.jsonl", out="made/for/merged")
    assert run_cli(cli_args(world, case)) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not os.path.exists(world.path("made"))
    os.makedirs(world.path("kept/for"))  # folders that were there before stay
    case = Case("old-folders", calibration="missing.jsonl", out="kept/for/merged")
    assert run_cli(cli_args(world, case)) == 2
    assert os.listdir(world.path("kept/for")) == []


def test_interrupted_says_how_to_continue(in_world, monkeypatch, capsys):
    import mergekit_com.io.checkpoints as ck

    def interrupt(self, key, *a):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.LayerCheckpoints, "save", interrupt)
    assert run_cli(cli_args(in_world, Case("ctrl-c"))) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "mergekit-com: error: interrupted; run the same command again to continue"
