"""Every row of docs/errors.md's "What happens when..." table, run through mergekit-com.

A case that stops must exit 2 with exactly one line, ``mergekit-com: error:``
and the documented message, create neither out_path nor a work directory, and
run before any layer is merged. A case that merges must log the documented
warning and produce the model.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch

from mergekit_com import cli
from mergekit_com.errors import ChainConfigError
from tests.support.bad_inputs import CASES, Case, World, cli_args, documented_rows
from tests.support.merging import count_merged_layers, read_tensors


@pytest.fixture(scope="module")
def world(zoo2, tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("bad_inputs")), zoo2)


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.chdir(world.root)
    world.merged_layers = count_merged_layers(monkeypatch)
    return world


def run_cli(args) -> int:
    """mergekit-com in this process; its exit code."""
    try:
        cli.main(args)
        return 0
    except SystemExit as e:
        return e.code


def test_docs_list_every_case_and_nothing_else():
    assert set(documented_rows()) == set(CASES)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_case_behaves_as_the_docs_say(in_world, case_id, capsys, caplog):
    world, case = in_world, CASES[case_id]
    outcome, message = documented_rows()[case_id]
    args = cli_args(world, case)
    before = world.prepare_out(case)
    capsys.readouterr()  # building the inputs prints progress bars
    caplog.set_level(logging.WARNING)
    code = run_cli(args)
    err = capsys.readouterr().err
    out = world.path(case.out_path)
    assert not os.path.exists(out + ".com-work"), "the work directory is left behind"
    if outcome == "stops":
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("mergekit-com: error: "), err
        actual = lines[0].removeprefix("mergekit-com: error: ")
        assert actual == message, f"README row for case {case_id} should read:\n{actual}"
        assert not os.path.exists(out), "out_path was created"
        assert world.merged_layers == [], "a layer was merged before the error"
    else:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert code == 0, err
        assert message in warnings, f"case {case_id} warned:\n" + "\n".join(warnings)
        assert all(torch.isfinite(t).all() for t in read_tensors(out).values())
        for name, data in before.items():  # case 15: see test_existing_out_path
            if name != "config.json":
                assert open(os.path.join(out, name), "rb").read() == data


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


def test_existing_out_path_is_replaced_only_when_complete(in_world):
    # case 15, as mergekit-yaml: same-named files replaced, others kept ...
    world, case = in_world, CASES["15"]
    out = world.path(case.out_path)
    before = world.prepare_out(case)
    snapshot = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    # ... and a merge that fails leaves it exactly as it was
    failing = Case("15-fail", expert="expert_nan", out=case.out_path)
    assert run_cli(cli_args(world, failing)) == 2
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == snapshot
    assert run_cli(cli_args(world, case)) == 0
    assert open(os.path.join(out, "notes.txt"), "rb").read() == before["notes.txt"]
    assert open(os.path.join(out, "config.json"), "rb").read() != before["config.json"]
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
