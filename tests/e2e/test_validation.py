"""Bad configurations stop before any work, naming what to fix."""

import logging
import os
import subprocess
import sys

import pytest
import yaml

from mergekit_com.errors import ChainConfigError
from tests.support.merging import com_config, experts, merge


def bad_configs(zoo):
    ok = experts(zoo)
    no_cal = [dict(ok[0]), {"model": zoo["expert1"]}]
    missing_file = [dict(ok[0]), {"model": zoo["expert1"], "calibration": "/nonexistent/x.jsonl"}]
    negative = [dict(ok[0]), dict(ok[1], weight=-1.0)]
    respelled = ok + [dict(ok[0], model=ok[0]["model"] + "/")]  # the same folder, written again
    return {
        "misspelled": (com_config(ok, alpah=0.9), r"unknown parameter 'alpah'.*valid parameters: .*alpha"),
        "alpha": (com_config(ok, alpha=2), r"'alpha' = 2.* must be in \[0, 1\]"),
        "chain": (com_config(ok, chain="foo"), r"'chain' = 'foo'.*module, block, none"),
        "objective": (com_config(ok, objective="bar"), r"'objective' = 'bar'"),
        "fallback": (com_config(ok, fallback="median"), r"'fallback' = 'median'"),
        "num_samples": (com_config(ok, num_samples=0), r"'num_samples' = 0.*positive"),
        "max_seq_len": (com_config(ok, max_seq_len=-3), r"'max_seq_len' = -3.*positive"),
        "type": (com_config(ok, alpha="high"), r"'alpha' = 'high' .*must be a number in \[0, 1\] or auto"),
        "bool_number": (com_config(ok, num_samples=True), r"'num_samples' = True is not an integer"),
        "optional_string": (com_config(ok, calibration_column=5), r"'calibration_column' = 5 is not a string$"),
        "nan": (com_config(ok, alpha=float("nan")), r"'alpha' = nan .*must be a finite number"),
        "weight": (com_config(negative), r"'weight' = -1.0.*>= 0"),
        "respelled": (com_config(respelled), r"models .*expert0 and .*expert0/ are one model with the "
                                             r"same calibration data, so it would count twice"),
        "no_calibration": (com_config(no_cal), r"expert1 has no `calibration`"),
        "missing_file": (com_config(missing_file), r"/nonexistent/x.jsonl.*does not exist"),
        "ta_without_base": (com_config(ok, fallback="task_arithmetic"), r"needs a base_model"),
        "per_model_chain": (com_config([dict(ok[0], chain="none"), ok[1]]),
                            r"'chain' applies to the whole merge"),
    }


@pytest.mark.parametrize("case", [
    "misspelled", "alpha", "chain", "objective", "fallback", "num_samples", "max_seq_len",
    "type", "bool_number", "optional_string", "nan", "weight", "respelled", "no_calibration", "missing_file", "ta_without_base", "per_model_chain",
])
def test_bad_config_fails_before_any_work(zoo2, tmp_path, case):
    cfg, pattern = bad_configs(zoo2)[case]
    out = tmp_path / "out"
    with pytest.raises(ChainConfigError, match=pattern):
        merge(cfg, str(out))
    assert not out.exists()


def test_cli_prints_one_line(zoo2, tmp_path):
    cfg, _ = bad_configs(zoo2)["alpha"]
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-com"),
                        str(path), str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("mergekit-com: error:")]
    assert len(errors) == 1 and "alpha" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_max_seq_len_beyond_the_positions_cuts_records_but_keeps_the_batch_budget(
        zoo2, tmp_path, monkeypatch, caplog):
    """zoo2's models have 256 positions: records are cut to 256 tokens (with a warning),
    and a batch still packs up to batch_size x max_seq_len tokens, as set."""
    from mergekit_com.integration import chain_task

    budgets = []
    real = chain_task.make_batches

    def spied(sequences, batch_size, pad_id=0, max_tokens=None):
        assert all(len(s) <= 256 for s in sequences)
        budgets.append(max_tokens)
        return real(sequences, batch_size, pad_id=pad_id, max_tokens=max_tokens)

    monkeypatch.setattr(chain_task, "make_batches", spied)
    with caplog.at_level(logging.WARNING):
        merge(com_config(experts(zoo2), max_seq_len=1024, batch_size=2), str(tmp_path / "out"))
    assert budgets == [2 * 1024, 2 * 1024]  # one per expert
    assert any("max_seq_len 1024 is more than the model's 256 positions" in r.getMessage()
               for r in caplog.records)


def test_experts_whose_configs_differ_in_computation_are_named(zoo2, tmp_path, caplog):
    """A config field a layer computes with (here rms_norm_eps) that differs between experts
    is warned about, naming both and the model whose value the merge takes; bookkeeping
    fields (transformers_version, use_cache, ...) are not."""
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(zoo2["expert1"], other)
    config = json.loads((other / "config.json").read_text())
    config.update(rms_norm_eps=0.01, use_cache=not config.get("use_cache", True),
                  transformers_version="0.0.1")
    (other / "config.json").write_text(json.dumps(config))
    caplog.set_level(logging.WARNING)
    ok = experts(zoo2)
    merge(com_config([ok[0], dict(ok[1], model=str(other))]), str(tmp_path / "out"))
    warned = [r.getMessage() for r in caplog.records if "differ in config.json" in r.getMessage()]
    assert len(warned) == 1 and "(rms_norm_eps: 0.01 vs 1e-06)" in warned[0], warned
    assert f"takes {ok[0]['model']}'s" in warned[0]
