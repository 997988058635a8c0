"""``make demo``: build (or reuse) the tiny zoo, merge it with CoM through
``mergekit-yaml``, and compare against the base, the experts and mergekit's
task arithmetic on every task.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mergekit_com.quiet import quiet_libraries

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "example_configs/tiny_zoo_com.yml"
TA_SCALE = 0.7


def _mergekit_yaml(config: str, out: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    exe = Path(sys.executable).with_name("mergekit-yaml")
    # one thread: tiny models on 2 shared cores run far faster that way
    subprocess.run([str(exe), config, str(out), "--quiet", "--num-threads", "1"], check=True)
    return time.perf_counter() - start


def _answer(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mergekit_com.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="zoo_cache/tiny")
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true", help="show the libraries' output too")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the example config's paths are relative to the repository
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries(args.verbose)
    torch.set_num_threads(args.threads)

    from mergekit_com.evaluate import evaluate_model, load_model, markdown_table, normalized_accuracy
    from mergekit_com.zoo import build_zoo
    from mergekit_com.zoo.baselines import run_baseline

    t0 = time.perf_counter()
    zoo = build_zoo("tiny", args.zoo)
    print(f"zoo: {zoo.root} ({'cached' if zoo.cached else f'built in {time.perf_counter() - t0:.0f} s'})")

    out = Path(args.out)
    com_dir = out / "chain_of_merges"
    seconds = _mergekit_yaml(CONFIG, com_dir)
    print(f"\nmergekit-yaml {CONFIG} {com_dir}: {seconds:.1f} s")
    print(f"merged model: {com_dir.resolve()}")

    model, tok = load_model(com_dir)
    print("\nhow it answers (greedy):")
    from mergekit_com.evaluate import load_records

    for task in zoo.tasks:
        rec = load_records(zoo.data_file(task, "eval"), limit=1)[0]
        print(f"  {rec['prompt']!r:28} -> {_answer(model, tok, rec['prompt'])!r:12} (expected {rec['answer']!r})")

    # the scale `make bench` picks for task arithmetic on the val split
    ta_dir = run_baseline(zoo, "task_arithmetic", weight=TA_SCALE, out_dir=out / "task_arithmetic")
    results = {name: zoo.results["eval"][name] for name in ["base", *[f"expert_{t}" for t in zoo.tasks]]}
    results["mergekit task_arithmetic"] = evaluate_model(ta_dir, zoo.data_dir, zoo.tasks)
    results["chain_of_merges"] = evaluate_model(com_dir, zoo.data_dir, zoo.tasks)
    experts = {t: zoo.results["eval"][f"expert_{t}"][t] for t in zoo.tasks}
    print("\nexact-match accuracy (%) on held-out eval data:\n")
    print(markdown_table(results))
    print("\nnormalized accuracy (merged / expert, mean over tasks):")
    for name in ("base", "mergekit task_arithmetic", "chain_of_merges"):
        label = f"{name} (weights {TA_SCALE:g})" if "task_arithmetic" in name else name
        print(f"  {label:40} {100 * normalized_accuracy(results[name], experts):.1f}%")


if __name__ == "__main__":
    main()
