"""bench verdict: whether the defaults match our best and beat mergekit, from the JSON."""

import json

from mergekit_com.bench import verdict
from mergekit_com.bench.methods import DEFAULTS_ROW
from mergekit_com.method.parameters import PARAMETERS

DEFAULTS = {p.name: p.default for p in PARAMETERS.values() if not p.per_model}


def _cand(name, params, acc, half=0.02):
    return {"name": name, "params": params,
            "eval": {"normalized_accuracy": acc, "normalized_ci": [acc - half, acc + half]}}


def _method(name, merge_method, acc, half=0.02):
    return {"method": name, "merge_method": merge_method, "normalized_accuracy": acc,
            "normalized_ci": [acc - half, acc + half]}


def _write(tmp_path, name, result):
    path = tmp_path / name
    path.write_text(json.dumps({"preset": "tiny", "seed": 0, **result}))
    return path


def test_defaults_inside_the_best_interval_and_above_mergekit(tmp_path):
    cands = _write(tmp_path, "candidates.json", {"defaults": DEFAULTS, "candidates": [
        _cand("defaults", {"chain": "module"}, 0.90),
        _cand("match_expert", {"objective": "match_expert"}, 0.915),  # 1.5 points up, CI holds 0.90
    ]})
    qual = _write(tmp_path, "quality.json", {"defaults": DEFAULTS, "methods": [
        _method("ties", "ties", 0.85), _method("linear", "linear", 0.60),
    ]})
    zoos = verdict.collect([cands, qual])
    assert zoos["tiny"]["defaults"][0] == "defaults"
    match, beat = verdict.judge(zoos["tiny"])
    assert match.startswith("yes") and "+1.5" in match
    assert beat == "yes (intervals apart)"


def test_defaults_that_lose_are_reported_as_losing(tmp_path):
    qual = _write(tmp_path, "quality.json", {"defaults": DEFAULTS, "methods": [
        _method(DEFAULTS_ROW, "chain_of_merges", 0.80, half=0.01),
        _method("CoM (chain: module)", "chain_of_merges", 0.90, half=0.01),
        _method("ties", "ties", 0.81, half=0.01),
    ]})
    match, beat = verdict.judge(verdict.collect([qual])["tiny"])
    assert match.startswith("no") and "+10.0" in match
    assert beat == "no measurable difference"  # [0.79, 0.81] overlaps [0.80, 0.82]


def test_results_from_other_defaults_are_not_taken_for_todays(tmp_path):
    old = dict(DEFAULTS, alpha=0.5 if DEFAULTS["alpha"] != 0.5 else 0.25)
    stale = _write(tmp_path, "old.json", {"defaults": old, "candidates": [_cand("defaults", {}, 0.9)]})
    unknown = _write(tmp_path, "older.json", {"candidates": [_cand("defaults", {}, 0.9)]})
    assert verdict.collect([stale])["tiny"]["defaults"] is None
    stale_quality = _write(tmp_path, "old_quality.json", {"defaults": old, "methods": [
        _method(DEFAULTS_ROW, "chain_of_merges", 0.8)]})
    assert verdict.collect([stale_quality])["tiny"]["defaults"] is None
    assert verdict.collect([unknown])["tiny"]["defaults"] is None
    # a candidate that spells out a differing setting is today's default again
    spelled = _write(tmp_path, "spelled.json", {"defaults": old, "candidates": [
        _cand("spelled", {"alpha": DEFAULTS["alpha"]}, 0.9)]})
    assert verdict.collect([spelled])["tiny"]["defaults"][0] == "spelled"
    assert "no defaults row" in verdict.table(verdict.collect([unknown]))


def test_matrix_lines_up_each_variant_across_zoos(tmp_path):
    a = _write(tmp_path, "a.json", {"defaults": DEFAULTS, "candidates": [
        _cand("defaults", {}, 0.90), _cand("regmean a=1", {"alpha": 1.0}, 0.80)]})
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"preset": "chat", "seed": 0, "candidates": [
        _cand("defaults", {}, 0.70),  # unknown defaults: left out, not mislabelled
        _cand("regmean a=1", {"alpha": 1.0}, 0.85)]}))
    lines = verdict.matrix(verdict.collect([a, b])).splitlines()
    assert lines[0] == "| variant | chat | tiny |"
    assert sorted(lines[2:]) == ["| defaults |  | 90.0 [88.0, 92.0] |",
                                 "| regmean a=1 | 85.0 [83.0, 87.0] | 80.0 [78.0, 82.0] |"]


def test_zoos_built_with_other_tasks_are_kept_apart(tmp_path):
    def result(name, tasks, custom, acc):
        path = tmp_path / name
        path.write_text(json.dumps({"preset": "tiny", "seed": 0, "tasks": tasks, "custom_tasks": custom,
                                    "defaults": DEFAULTS,
                                    "candidates": [_cand("defaults", {}, acc)]}))
        return path

    paths = [result("a.json", ["max", "sort"], False, 0.9), result("b.json", ["swap", "last"], True, 0.8),
             result("c.json", ["max", "swap"], True, 0.7)]
    header = verdict.matrix(verdict.collect(paths)).splitlines()[0]
    assert header == "| variant | tiny | tiny [max,swap] | tiny [swap,last] |"


def test_a_zoo_whose_experts_all_scored_zero_is_undefined_not_a_tie(tmp_path):
    nan = float("nan")  # normalized accuracy with nothing to normalize by (json writes NaN)
    qual = _write(tmp_path, "quality.json", {"defaults": DEFAULTS, "methods": [
        {"method": DEFAULTS_ROW, "merge_method": "chain_of_merges", "normalized_accuracy": nan,
         "normalized_ci": [nan, nan]},
        {"method": "ties", "merge_method": "ties", "normalized_accuracy": nan, "normalized_ci": [nan, nan]},
    ]})
    zoos = verdict.collect([qual])
    assert verdict.judge(zoos["tiny"]) == (verdict.UNDEFINED, verdict.UNDEFINED)
    assert "no measurable difference" not in verdict.table(zoos)
    assert "no expert scored above 0" in verdict.table(zoos)


def test_the_other_benchmarks_json_in_the_same_folder_is_skipped(tmp_path, capsys):
    """`bench verdict bench_out/*.json` as docs/benchmark.md writes it: bench kernels, cost
    and scale save there too; their files are named and skipped, not a KeyError."""
    import pytest

    _write(tmp_path, "quality.json", {"defaults": DEFAULTS, "methods": [
        _method(DEFAULTS_ROW, "chain_of_merges", 0.9), _method("ties", "ties", 0.85)]})
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "cost.json").write_text(json.dumps([{"model": "pico"}]))
    verdict.main(sorted(str(p) for p in tmp_path.glob("*.json")))
    out = capsys.readouterr().out
    assert "skipped" in out and "kernels.json" in out and "cost.json" in out
    assert "| tiny |" in out
    with pytest.raises(SystemExit, match="none of the files given is a bench quality"):
        verdict.main([str(tmp_path / "kernels.json")])


def test_a_zoo_whose_experts_did_not_learn_their_task_is_flagged(tmp_path, capsys):
    """bench quality records them; the verdict is printed with a note, since their tasks'
    noise can decide it (an expert at 3.5% makes every interval ~15 points wide)."""
    weak = _write(tmp_path, "quality.json", {"defaults": DEFAULTS, "weak_experts": {"add": [0.035, 0.025]},
                                              "methods": [_method(DEFAULTS_ROW, "chain_of_merges", 0.9),
                                                          _method("ties", "ties", 0.86)]})
    sound = _write(tmp_path, "other.json", {"seed": 1, "defaults": DEFAULTS, "methods": [
        _method(DEFAULTS_ROW, "chain_of_merges", 0.9), _method("ties", "ties", 0.8)]})
    verdict.main([str(weak), str(sound)])
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == ["note: tiny: these experts did not learn their task (val accuracy): expert_add "
                     "3.5% (base 2.5%); their tasks widen every interval and can decide the verdict: "
                     "rebuild the zoo without them (--tasks) before reading it"]


def test_regmean_candidates_name_their_objective():
    """The default objective is blend: a row called regmean must say so, or it runs blend."""
    from mergekit_com.bench.methods import candidates

    for name, method, _ in candidates():
        if "regmean" in name.lower():
            assert method.params.get("objective") == "regmean", name
