"""python -m mergekit_com.bench [quality | candidates | budget | scale | cost | kernels] --preset tiny [--seed N]

quality: every method, knobs tuned on val, scored on eval (with 95% bootstrap CIs);
candidates: fixed configurations of ours (the defaults investigation), on val and eval;
budget: the default merge against calibration tokens per expert; scale: cost vs depth;
cost: CoM against its compute floor; kernels: the walk's blocked products against plain ones;
verdict: do the defaults win (from those JSONs)?
See docs/benchmark.md and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _zoo_dir(args) -> Path:
    from ..zoo.build import default_zoo_dir

    return Path(args.zoo) if args.zoo else default_zoo_dir(args.preset, args.seed)


def _tasks(args) -> dict:
    """--tasks as zoo overrides (validated before any work: one line on a typo)."""
    if args.tasks is None:
        return {}
    from ..zoo.tasks import get_task, task_names

    try:
        tasks = task_names(args.tasks)
        for t in tasks:
            get_task(t)
    except (KeyError, ValueError) as e:
        sys.exit(f"error: {e.args[0]}")
    return {"tasks": tuple(dict.fromkeys(tasks))}


def _title(result: dict, args, what: str) -> str:
    seed = f", seed {result['seed']}" if result.get("seed") else ""
    if result.get("custom_tasks"):
        seed += f", tasks {','.join(result['tasks'])}"
    return (f"\n## {result['preset']} zoo{seed}, {what} ({result['machine']}, device {args.device}, "
            f"{args.threads} thread(s))\n")


def _save(result: dict, args, name: str) -> Path:
    """Stamp the machine on ``result`` and write it to ``--out``/``name``; returns --out."""
    from . import report

    result["machine"] = report.machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(result, out / name)
    return out


def _candidates(args) -> None:
    from . import quality, report

    result = quality.run_candidates(args.preset, _zoo_dir(args), Path(args.out), threads=args.threads,
                                    device=args.device, seed=args.seed, zoo_overrides=_tasks(args),
                                    only=args.methods.split(",") if args.methods else None,
                                    backend=args.backend)
    out = _save(result, args, "candidates.json")
    print(_title(result, args, "fixed configurations of chain_of_merges"))
    print(report.candidates_table(result))
    print(f"\nbenchmark took {result['seconds'] / 60:.1f} min; wrote {out / 'candidates.json'}")


def _budget(args) -> None:
    from . import quality, report

    counts = [int(n) for n in args.counts.split(",")] if args.counts else None
    result = quality.run_budget(args.preset, _zoo_dir(args), Path(args.out), threads=args.threads,
                                device=args.device, seed=args.seed, counts=counts, zoo_overrides=_tasks(args),
                                variants=args.methods.split(",") if args.methods else None,
                                backend=args.backend)
    out = _save(result, args, "budget.json")
    report.plot_budget(result, out / "budget.png")
    print(_title(result, args, "normalized accuracy (eval, 95% CI) against calibration budget"))
    print(report.budget_table(result))
    print(f"\nbenchmark took {result['seconds'] / 60:.1f} min; wrote {out / 'budget.json'}, "
          f"{out / 'budget.png'}")


def _quality(args) -> None:
    from . import quality, report

    result = quality.run(args.preset, _zoo_dir(args), Path(args.out),
                         threads=args.threads, device=args.device, seed=args.seed, zoo_overrides=_tasks(args),
                         only=args.methods.split(",") if args.methods else None,
                         ablation=not args.no_ablation, backend=args.backend,
                         tune_limit=args.tune_limit)
    out = _save(result, args, "quality.json")
    report.plot_quality(result, out / "quality.png")
    drew_shift = report.plot_shift(result, out / "covariate_shift.png")
    print(_title(result, args, "eval split"))
    print(report.quality_table(result))
    cost = report.cost_table(result)
    if cost:
        print("\nWhere the chain_of_merges merges spend their time (mergekit-yaml, whole run):\n")
        print(cost)
    if result["ablation"]:
        print("\nCoM normalized accuracy (%, 95% CI) over alpha and num_samples (eval split, other knobs "
              "as tuned):\n")
        print(report.ablation_table(result["ablation"]))
    shifts = report.shift_by_layer(result)
    if shifts:
        print("\nCovariate shift entering each layer (com_report.json, mean over experts):\n")
        print(report.shift_table(shifts))
    pngs = ", ".join(str(out / n) for n in ("quality.png", "covariate_shift.png")[: 1 + drew_shift])
    print(f"\nbenchmark took {result['seconds'] / 60:.1f} min; wrote {out / 'quality.json'}, {pngs}")


def _scale(args) -> None:
    from . import scale

    depths = tuple(int(d) for d in args.depths.split(","))
    result = scale.run(Path(args.out) / "scale", depths, threads=args.threads, device=args.device)
    result["ratios"] = scale.ratios(result)
    out = _save(result, args, "scale.json")
    shape = result["shape"]
    print(f"\n## CoM cost vs depth ({result['machine']}, device {args.device}, {args.threads} thread(s))\n")
    print(f"pico Llama, hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
          f"{result['experts']} experts, {result['calibration_tokens']} calibration tokens in all\n")
    print(scale.table(result))
    diffs = [r["naive_max_abs_diff"] for r in result["rows"] if "naive_max_abs_diff" in r]
    if diffs:
        print(f"\nnaive chain vs CoM, largest |difference| in any output tensor: {max(diffs):.2e}")
    for name, value in result["ratios"].items():
        print(f"\n{name}: {value:.2f}", end="")
    print(f"\n\nbenchmark took {result['seconds'] / 60:.1f} min; wrote {out / 'scale.json'}")


def _cost(args) -> None:
    from . import cost

    families = args.families.split(",")
    threads = tuple(int(t) for t in args.thread_counts.split(","))
    result = cost.run(Path(args.out) / "cost", families, threads, Path(args.zoo_cache))
    result["speedups"] = cost.speedups(result)
    out = _save(result, args, "cost.json")
    print(f"\n## CoM against its compute floor ({result['machine']})\n")
    print(cost.table(result))
    for family, gains in result["speedups"].items():
        print(f"\n{family}: 1 thread / 2 threads: " + ", ".join(f"{k} {v:.2f}x" for k, v in gains.items()),
              end="")
    print(f"\n\nbenchmark took {result['seconds'] / 60:.1f} min; wrote {out / 'cost.json'}")


def _kernels(args) -> None:
    from . import kernels

    start = time.perf_counter()
    result = kernels.run(tuple(int(t) for t in args.thread_counts.split(",")))
    out = _save(result, args, "kernels.json")
    print(f"\n## The walk's blocked products against one product ({result['machine']}, fastest of "
          f"{result['repeats']} each)\n")
    print(kernels.table(result))
    print(f"\nbenchmark took {time.perf_counter() - start:.0f} s; wrote {out / 'kernels.json'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mergekit_com.bench", description=__doc__)
    ap.add_argument("what", nargs="?", default="quality",
                    choices=["quality", "candidates", "budget", "scale", "cost", "kernels", "verdict"])
    ap.add_argument("results", nargs="*", help="verdict: quality.json / candidates.json files")
    ap.add_argument("--preset", default="tiny", help="zoo preset: tiny, smollm2, chat, or quick (tests)")
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed (default 0)")
    ap.add_argument("--zoo", default=None, help="zoo dir (default zoo_cache/<preset>[-seed<N>]); an existing "
                    "zoo is used with its own tasks")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated task subset to build the zoo with (default: an existing zoo's, "
                         "else the preset's); see python -m mergekit_com.zoo --list-tasks")
    ap.add_argument("--out", default="bench_out", help="where merges, JSON and PNG go")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for merges and scoring")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--backend", default="own", choices=["own", "lm-eval"],
                    help="quality/candidates/budget: score merges with our greedy loop (default, faster) "
                         "or lm-evaluation-harness (needs mergekit-com[eval])")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset (row labels or merge_method; candidates: their names; "
                         "budget: candidates drawn next to the defaults)")
    ap.add_argument("--counts", default=None, help="budget: comma-separated num_samples values")
    ap.add_argument("--depths", default="4,8,16,32", help="scale: layer counts")
    ap.add_argument("--no-ablation", action="store_true", help="skip the alpha x num_samples grid")
    ap.add_argument("--tune-limit", type=int, default=None,
                    help="quality: tune on the first N val prompts per task (default: all)")
    ap.add_argument("--families", default="pico,smollm2,zoo:tiny",
                    help="cost: pico, smollm2 and zoo:<preset> (a zoo built under --zoo-cache)")
    ap.add_argument("--zoo-cache", default="zoo_cache", help="cost: where the zoos are built")
    ap.add_argument("--thread-counts", default="1,2", help="cost, kernels: thread counts to compare")
    args = ap.parse_args(argv)

    if args.what == "verdict":  # reads JSON only: no torch set-up
        from . import verdict

        return verdict.main(args.results)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("mergekit_com.bench").setLevel(logging.INFO)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings and progress bars
    if args.backend == "lm-eval" and args.what in ("quality", "candidates", "budget"):
        from ..evaluate_lmeval import LmEvalMissing, require_lmeval

        try:  # before any merge
            require_lmeval()
        except LmEvalMissing as e:
            sys.exit(f"error: {e}")
    from .quality import ZooMismatch

    try:
        {"scale": _scale, "cost": _cost, "kernels": _kernels, "candidates": _candidates,
         "budget": _budget, "quality": _quality}[args.what](args)
    except ZooMismatch as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
