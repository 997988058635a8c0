"""The quality benchmark end to end on the miniature zoo, and its tuning rule."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from mergekit_com.bench import quality, report  # noqa: E402
from mergekit_com.bench.methods import Method, methods  # noqa: E402
from mergekit_com.zoo import build_zoo  # noqa: E402

ROWS = ["linear", "ties", "CoM (chain: module)"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    zoo_dir = root / "zoo"
    build_zoo(out_dir=zoo_dir, quick=True)
    # the quick zoo has 8 calibration records per task
    result = quality.run("quick", zoo_dir, root / "out", only=ROWS,
                         extra={"num_samples": 8, "max_seq_len": 32})
    return root, result


def test_benchmark_runs_end_to_end(mini):
    root, result = mini
    assert [r["method"] for r in result["methods"]] == ROWS
    ties = next(r for r in result["methods"] if r["method"] == "ties")
    assert [t["knobs"] for t in ties["trials"]] == [{"lambda": 0.5}, {"lambda": 1.0}]
    assert ties["tuned"] in [t["knobs"] for t in ties["trials"]]
    for row in result["methods"]:
        assert set(row["eval"]) == {"max", "reverse"}
        assert all(0 <= s["accuracy"] <= 1 and s["n"] == 8 for s in row["eval"].values())
        m = row["measure"]
        assert m["wall_s"] >= m["merge_s"] > 0 and m["peak_rss_mb"] > 50
        # only the chosen merge is kept, and it is a loadable model
        assert os.path.exists(os.path.join(row["path"], "config.json"))
    kept = sorted(os.listdir(root / "out" / "merges"))
    assert len(kept) == len(ROWS), kept
    assert [(r["alpha"], r["num_samples"]) for r in result["ablation"]] == [(0.9, 4), (1.0, 4), (0.9, 8), (1.0, 8)]
    assert set(result["references"]) == {"base", "expert_max", "expert_reverse", "multitask"}


def test_benchmark_outputs(mini, tmp_path):
    _, result = mini
    report.write_json(result, tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text())["methods"][0]["method"] == "linear"
    report.plot_quality(result, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.quality_table(result).splitlines()
    assert table[0].startswith("| method | tuned on val | max | reverse | mean | normalized [95% CI] |")
    assert sum(line.startswith("| CoM (chain: module) | alpha=0.9, lambda=0.5 |") for line in table) == 1
    assert report.ablation_table(result["ablation"]).splitlines()[2].startswith("| 4 |")
    cost = report.cost_table(result).splitlines()
    assert len(cost) == 3 and cost[2].startswith("| CoM (chain: module) |")
    column = [c.strip() for c in cost[0].split("|")].index("calibration tokens")
    tokens = int(cost[2].split("|")[column])  # 8 calibration records of each of the 2 experts
    assert tokens >= 16
    shifts = report.shift_by_layer(result)
    assert list(shifts) == ["CoM (chain: module)"] and len(shifts["CoM (chain: module)"]) == 2  # layer 0, head
    assert all(v >= 0 for v in shifts["CoM (chain: module)"])
    assert report.plot_shift(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert report.shift_table(shifts).splitlines()[0] == "| method | layer 0 | head |"


def test_tuning_keeps_the_best_validation_setting(tmp_path, monkeypatch):
    """The knob with the best val score is kept, scored on eval; the others are deleted."""
    zoo = build_zoo(out_dir=tmp_path / "zoo", quick=True)
    bench = quality.QualityBench(zoo, tmp_path / "out")
    bench.experts_val = bench.experts_eval = {"max": 1.0, "reverse": 1.0}
    perfect = {t: {"accuracy": 1.0, "loss": 0.0, "n": 10, "correct": "1" * 10} for t in ("max", "reverse")}
    bench.expert_scores = {"val": perfect, "eval": perfect}
    val_acc = {"lambda=0.5": 0.2, "lambda=1": 0.6, "lambda=1.5": 0.4}
    scored = []

    def fake_score(path, split, limit=None):
        assert limit is None  # no --tune-limit: the whole val split
        knob = next(k for k in val_acc if path.name.endswith(k))
        scored.append((knob, split))
        acc = val_acc[knob] if split == "val" else 0.5
        flags = "1" * round(10 * acc) + "0" * (10 - round(10 * acc))
        return {t: {"accuracy": acc, "loss": 0.0, "n": 10, "correct": flags} for t in ("max", "reverse")}

    monkeypatch.setattr(bench, "_score", fake_score)
    row = bench.tune_and_evaluate(Method("ta", "task_arithmetic", grid={"lambda": (0.5, 1.0, 1.5)}))
    assert row["tuned"] == {"lambda": 1.0}
    assert scored[-1] == ("lambda=1", "eval") and row["normalized_accuracy"] == 0.5
    assert os.listdir(tmp_path / "out" / "merges") == ["ta_lambda=1"]


def test_every_method_goes_through_mergekit_with_the_same_experts(tmp_path):
    zoo = build_zoo(out_dir=tmp_path / "zoo", quick=True)
    for m in methods():
        cfg = m.config(zoo, m.knob_settings()[0])
        assert [x["model"] for x in cfg["models"]] == [str(p) for p in zoo.experts.values()]
        assert ("calibration" in cfg["models"][0]["parameters"]) == m.ours
        assert ("base_model" in cfg) == (m.merge_method != "linear")


def test_rows_carry_bootstrap_intervals(mini):
    _, result = mini
    for row in [*result["methods"], *result["references"].values()]:
        low, high = row["normalized_ci"]
        if row["normalized_accuracy"] == row["normalized_accuracy"]:  # not nan
            assert low <= row["normalized_accuracy"] <= high
        assert set(row["task_ci"]) == {"max", "reverse"}
    assert all("normalized_ci" in r for r in result["ablation"])
    assert all(r["tokens_per_expert"] and len(r["tokens_per_expert"]) == 2 for r in result["ablation"])


def test_candidates_and_budget_modes(tmp_path):
    zoo_dir = tmp_path / "zoo"
    build_zoo(out_dir=zoo_dir, quick=True)
    extra = {"max_seq_len": 32}
    cand = quality.run_candidates("quick", zoo_dir, tmp_path / "c", only=["defaults", "regmean a=1"],
                                  extra={"num_samples": 8, **extra})
    assert [r["name"] for r in cand["candidates"]] == ["defaults", "regmean a=1"]
    for row in cand["candidates"]:
        assert set(row) >= {"val", "eval", "params", "measure", "tokens_per_expert"}
        assert len(row["eval"]["normalized_ci"]) == 2
    table = report.candidates_table(cand).splitlines()
    assert table[2].startswith("| defaults |") and "alpha=1" in table[3]
    assert not (tmp_path / "c" / "merges").exists() or not os.listdir(tmp_path / "c" / "merges")
    assert not (tmp_path / "c" / "candidates.partial.json").exists()  # complete: no partial left

    # an interrupted run keeps the candidates it finished
    real = quality.QualityBench.fixed
    calls = []

    def interrupted(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, name, *args, **kwargs)

    quality.QualityBench.fixed = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            quality.run_candidates("quick", zoo_dir, tmp_path / "i", only=["regmean a=1", "defaults"],
                                   extra={"num_samples": 8, **extra})
    finally:
        quality.QualityBench.fixed = real
    partial = json.loads((tmp_path / "i" / "candidates.partial.json").read_text())
    assert [r["name"] for r in partial["candidates"]] == ["regmean a=1"] and not partial["complete"]

    budget = quality.run_budget("quick", zoo_dir, tmp_path / "b", counts=[2, 8], extra=extra)
    rows = budget["budget"]
    assert [(r["variant"], r["num_samples"]) for r in rows] == [("defaults", 2), ("defaults", 8)]
    assert sum(rows[0]["tokens_per_expert"]) < sum(rows[1]["tokens_per_expert"])
    lines = report.budget_table(budget).splitlines()
    assert lines[0].startswith("| num_samples | tokens per expert (mean) | defaults |") and len(lines) == 4
    report.plot_budget(budget, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_table_compares_each_variant_with_the_floor():
    from mergekit_com.bench import cost
    from mergekit_com.method.timing import ORDER

    def merge(seconds):
        return {"merge_s": seconds, "phases": {p: 1.0 for p in ORDER}}

    rows = [{"family": "pico", "threads": t, "tokens": 100, "forward": 4.0 / t, "gram": 2.0 / t,
             "cross": 3.0 / t, "linear": merge(1.0), "floor": 7.0 / t if t == 1 else 4.0,
             "targets_floor": 14.0 / t if t == 1 else 7.5,
             "regmean": merge(10.0 / t), "com": merge(20.0 / t), "match_expert": merge(22.0 / t)}
            for t in (1, 2)]
    lines = cost.table({"rows": rows}).splitlines()
    cells = [c.strip() for c in lines[2].split("|")]
    head = [c.strip() for c in lines[0].split("|")]
    assert len(head) == len(cells) and set(lines[1]) == {"|", "-"} and lines[1].count("|") == len(head) - 1
    assert cells[head.index("regmean / floor")] == f"{10 / 7:.2f}"
    assert cells[head.index("defaults / floor")] == f"{20 / 7:.2f}"
    assert cells[head.index("defaults / targets' floor")] == f"{20 / 14:.2f}"
    assert cells[head.index("match_expert / targets' floor")] == f"{22 / 14:.2f}"
    assert cells[head.index("match_expert / defaults")] == "1.10"
    assert cost.speedups({"rows": rows}) == {"pico": {"floor": 7.0 / 4.0, "regmean": 2.0, "defaults": 2.0}}
    # the floor measured before and after the merges: each part's shorter time
    assert cost.faster({"forward": 3.0, "gram": 1.0, "cross": 2.0, "tokens": 10},
                       {"forward": 2.0, "gram": 1.5, "cross": 2.0, "tokens": 10}) == {
        "forward": 2.0, "gram": 1.0, "cross": 2.0, "tokens": 10}


def test_each_merge_keeps_its_fastest_round_and_short_families_run_more_rounds():
    from mergekit_com.bench import cost
    from mergekit_com.bench.measure import Measurement

    kept = cost.fastest([Measurement(wall_s=s + 1, merge_s=s, peak_rss_mb=1.0) for s in (3.0, 2.0, 4.0)])
    assert (kept["merge_s"], kept["wall_s"], kept["runs"]) == (2.0, 3.0, 3)
    # the first round's wall time per thread count decides: the zoos' (seconds) 5, pico's (minutes) 3,
    # SmolLM2's (most of an hour) 1
    assert [cost.rounds_after(s) for s in (0.0, 30.0, 59.9, 60.0, 300.0, 599.0, 600.0, 3000.0)] == [
        5, 5, 5, 3, 3, 3, 1, 1]


def test_the_rounds_interleave_the_floor_the_merges_and_the_thread_counts(monkeypatch, tmp_path):
    """Each round measures the floor at each thread count, then every merge at each thread
    count back to back; the floor once more at each thread count after the last round;
    every part and merge keeps its fastest measurement, per thread count."""
    import torch

    from mergekit_com.bench import cost
    from mergekit_com.bench.measure import Measurement

    events = []
    floors = {1: iter([5.0, 3.0, 4.0, 6.0, 7.0, 8.0]), 2: iter([2.5, 2.0, 3.0, 2.2, 2.4, 2.6])}
    times = {(1, "linear"): iter([1.0, 0.5, 0.9, 0.8, 0.7]), (1, "com"): iter([9.0, 8.0, 10.0, 7.5, 9.5]),
             (2, "linear"): iter([0.6, 0.4, 0.5, 0.5, 0.5]), (2, "com"): iter([5.0, 4.5, 4.0, 6.0, 5.5])}
    times.update({(t, "regmean"): iter([3.0 / t] * 5) for t in (1, 2)})

    def fake_floor(paths, spec):
        t = torch.get_num_threads()
        events.append(("floor", t))
        f = next(floors[t])
        return {"forward": f, "gram": f / 2, "cross": 1.0, "tokens": 10}

    def fake_run(cfg, dest, args):
        t = int(args[args.index("--num-threads") + 1])
        events.append((cfg, t))
        return Measurement(wall_s=1.0, merge_s=next(times[(t, cfg)]), peak_rss_mb=1.0)

    monkeypatch.setattr(cost, "floor", fake_floor)
    monkeypatch.setattr(cost, "run_yaml", fake_run)
    before = torch.get_num_threads()
    try:
        rows = cost.measure({}, cost.Family("pico"), {c: c for c in ("linear", "regmean", "com")}, (1, 2),
                            tmp_path)
    finally:
        torch.set_num_threads(before)
    one_round = [("floor", 1), ("floor", 2)] + [(c, t) for c in ("linear", "regmean", "com") for t in (1, 2)]
    assert events == one_round * 5 + [("floor", 1), ("floor", 2)]  # a first round well under a minute
    one, two = rows
    assert (one["threads"], two["threads"], one["rounds"], two["rounds"]) == (1, 2, 5, 5)
    assert (one["forward"], one["gram"], one["linear"]["merge_s"], one["com"]["merge_s"]) == (3.0, 1.5, 0.5, 7.5)
    assert (two["forward"], two["linear"]["merge_s"], two["com"]["merge_s"]) == (2.0, 0.4, 4.0)
    assert one["com"]["runs"] == 5 and one["floor"] == 3.0 + 1.5 + 0.5
    assert one["targets_floor"] == one["floor"] + 3.0 + 1.0
    gains = cost.speedups({"rows": rows})["pico"]
    assert gains == {"floor": one["floor"] / two["floor"], "regmean": 2.0, "defaults": 7.5 / 4.0}


def test_the_targets_floor_takes_each_groups_smaller_targets_moment():
    """The floor's cross term per group: ``X^T Z`` (input width squared) or, where the
    group's outputs are no wider than its input, ``X^T Y`` (what the walk forms there)."""
    from transformers import AutoModelForCausalLM

    from mergekit_com.bench import cost
    from tests.support import pico

    model = AutoModelForCausalLM.from_config(pico.llama_config(layers=2, hidden=32))
    h, kv, mlp = 32, 16, 64  # hidden, k/v outputs (2 of 4 heads), MLP width
    layer = [(h, h + 2 * kv), (h, h), (h, 2 * mlp), (mlp, h)]
    assert cost._group_widths(model) == layer * 2 + [(h, pico.VOCAB)]


def test_tuning_on_the_first_val_prompts_normalises_by_the_experts_on_the_same_prompts():
    # the expert got the first 4 prompts 3/4 right, all 8 prompts 5/8
    assert quality._head_accuracy({"correct": "11011100", "accuracy": 5 / 8}, 4) == 0.75
    assert quality._head_accuracy({"correct": "11011100", "accuracy": 5 / 8}, 100) == 5 / 8


def test_an_existing_zoo_is_benchmarked_with_its_own_tasks(tmp_path, monkeypatch):
    from mergekit_com.bench.__main__ import main

    built = build_zoo(out_dir=tmp_path / "zoo", quick=True, tasks=("swap", "max"))
    stamp = (built.root / "zoo.json").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)  # a zoo one folder deep, as `--zoo zoo` gives it
    zoo = quality._zoo("quick", "zoo", threads=1, seed=0)
    assert zoo.cached and zoo.tasks == ["swap", "max"] and (built.root / "zoo.json").stat().st_mtime_ns == stamp
    assert zoo.root.is_absolute()  # mergekit's card takes a relative "zoo/expert_max" for a Hub id
    assert quality._header(zoo, quality.QualityBench(zoo, tmp_path / "work"), "cpu", 1)["custom_tasks"] is True
    for asked in ({"preset": "tiny"}, {"seed": 1}, {"overrides": {"tasks": ("max",)}}):
        kwargs = {"preset": "quick", "seed": 0, **asked}
        with pytest.raises(quality.ZooMismatch, match="holds the 'quick' zoo of seed 0 with tasks swap,max"):
            quality._zoo(kwargs.pop("preset"), "zoo", threads=1, **kwargs)
    assert (built.root / "zoo.json").stat().st_mtime_ns == stamp  # nothing rebuilt over it
    with pytest.raises(SystemExit) as e:
        main(["quality", "--preset", "quick", "--zoo", "zoo", "--tasks", "max", "--out", "out"])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["quality", "--preset", "quick", "--zoo", "zoo", "--tasks", "swap,shfit", "--out", "out"])
    assert str(e.value).startswith("error: unknown task 'shfit'")


def test_our_scale_grid_starts_at_the_plain_average_of_the_experts():
    def scales(grid, experts):
        return next(m.grid["lambda"] for m in methods(grid, experts) if m.name == "CoM (chain: module)")

    assert scales("full", 5) == (0.2, 0.5, 1.0)  # the tiny zoo's five experts
    assert scales("full", 7) == (0.143, 0.5, 1.0) and scales("full", 2) == (0.5, 1.0)
    assert scales("smollm2", 4) == (0.25, 1.0)


def test_kernels_compare_each_blocked_product_with_the_one_it_replaces(monkeypatch):
    import torch

    from mergekit_com.bench import kernels
    from mergekit_com.method import linalg

    shapes = {"gram": [(300, 520)], "spread": [(3, 64, 600)]}  # several blocks each
    result = kernels.run(threads=(1,), repeats=2, shapes=shapes)
    assert [(r["kernel"], r["shape"], r["threads"]) for r in result["rows"]] == [
        ("gram", [300, 520], 1), ("spread", [3, 64, 600], 1)]
    assert all(r["ours_ms"] > 0 and r["speedup"] == pytest.approx(r["plain_ms"] / r["ours_ms"])
               for r in result["rows"])
    assert "| spread | 3 x 64 x 600 | 1 |" in kernels.table(result)
    # a blocked product that got a block wrong is refused before any timing
    monkeypatch.setattr(linalg, "product_sq_norms", lambda y: torch.zeros(y.shape[0], dtype=torch.float64))
    with pytest.raises(AssertionError):
        kernels.run(threads=(1,), repeats=1, shapes={"spread": [(3, 64, 600)]})
