"""CLI: python -m mergekit_com.zoo --preset tiny [--seed N] --out DIR [--check-merge]

python -m mergekit_com.zoo --write-lm-eval-tasks ZOO [--tasks-dir DIR] (re)writes the lm-eval
task configs of an already built zoo (by default into ZOO/tasks), without rebuilding it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mergekit_com.zoo",
                                 description="Build (or reuse) an offline expert zoo.")
    ap.add_argument("--preset", default="tiny",
                    help="tiny (default), smollm2 (real SmolLM2-135M base), chat (chat-formatted), quick (tests)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the data, initialisation and training (default 0)")
    ap.add_argument("--out", default=None, help="output dir (default zoo_cache/<preset>[-seed<N>])")
    ap.add_argument("--tasks", default=None, help="comma-separated task subset (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] for training and scoring")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    ap.add_argument("--check-merge", action="store_true",
                    help="also merge the experts with mergekit task_arithmetic / linear and score them")
    ap.add_argument("--list-tasks", action="store_true", help="print the available tasks and exit")
    ap.add_argument("--write-lm-eval-tasks", metavar="ZOO", default=None,
                    help="only (re)write the lm-eval task configs of the built zoo ZOO, then exit")
    ap.add_argument("--tasks-dir", default=None,
                    help="with --write-lm-eval-tasks: write them here instead of ZOO/tasks")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.quiet:  # our progress only, not mergekit's chatter
        logging.getLogger("mergekit_com").setLevel(logging.INFO)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    import torch

    from ..evaluate import normalized_accuracy
    from .build import DEFAULT_THREADS, build_zoo, default_zoo_dir
    from .smollm2 import BaseModelUnavailable
    from .tasks import TASKS, task_names

    if args.list_tasks:
        width = max(len(n) for n in TASKS)
        for t in TASKS.values():
            print(f"{t.name:{width}s} {t.description}  (base's mistake: {t.distractor})")
        return
    if args.write_lm_eval_tasks:
        from .lmeval_tasks import write_zoo_tasks

        try:
            out = write_zoo_tasks(args.write_lm_eval_tasks, args.tasks_dir)
        except OSError as e:
            sys.exit(f"error: {e}")
        print(f"wrote lm-eval task configs to {out} (see {out / 'README.md'})")
        return
    threads = args.threads or DEFAULT_THREADS
    torch.set_num_threads(threads)  # for the merges and scoring after the build too
    try:
        tasks = task_names(args.tasks)
        zoo = build_zoo(args.preset, args.out or default_zoo_dir(args.preset, args.seed), tasks,
                        threads=threads, force=args.force, device=args.device, seed=args.seed)
    except (BaseModelUnavailable, KeyError, ValueError) as e:
        sys.exit(f"error: {e.args[0] if e.args else e}")
    if args.check_merge:
        from .baselines import check_merges

        check_merges(zoo)

    from .build import describe_weak_experts

    if (warning := describe_weak_experts(zoo)) is not None:
        print(warning, file=sys.stderr)
    how = "cache hit" if zoo.cached else "built"
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in zoo.build_phases.items())
    print(f"zoo {zoo.preset!r} (seed {zoo.settings.get('seed', 0)}) at {zoo.root} ({how}; build took "
          f"{zoo.build_seconds:.0f}s{': ' + phases if phases else ''})\n")
    table = zoo.accuracy_table("eval")
    experts = {t: table[f"expert_{t}"][t] for t in zoo.tasks}
    print("| model | " + " | ".join(zoo.tasks) + " | mean | normalized |")
    print("|---" * (len(zoo.tasks) + 3) + "|")
    for name, acc in table.items():
        cells = [f"{100 * acc[t]:.1f}" for t in zoo.tasks]
        mean = sum(acc.values()) / len(acc)
        print(f"| {name} | " + " | ".join(cells)
              + f" | {100 * mean:.1f} | {100 * normalized_accuracy(acc, experts):.1f} |")


if __name__ == "__main__":
    main()
