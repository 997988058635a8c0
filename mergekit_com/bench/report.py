"""Benchmark output: a markdown table for stdout/README, the JSON, and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Dict, List


def machine() -> str:
    """One line naming the hardware the figures come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name(0)}"
    return line


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(row: dict) -> str:
    """"85.2 [83.0, 87.3]": normalized accuracy and its 95% bootstrap interval."""
    ci = row.get("normalized_ci")
    text = _pct(row["normalized_accuracy"])
    return f"{text} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else text


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in knobs.items()) or "-"


def quality_table(result: dict) -> str:
    tasks: List[str] = result["tasks"]
    head = ("| method | tuned on val | " + " | ".join(tasks)
            + " | mean | normalized [95% CI] | merge s | peak RSS MB |")
    lines = [head, "|---" * (len(tasks) + 6) + "|"]
    for name, ref in result["references"].items():
        cells = [_pct(ref["eval"][t]["accuracy"]) for t in tasks]
        mean = sum(ref["eval"][t]["accuracy"] for t in tasks) / len(tasks)
        lines.append(f"| *{name}* | | " + " | ".join(cells)
                     + f" | {_pct(mean)} | {_ci(ref)} | | |")
    best = max(r["normalized_accuracy"] for r in result["methods"]) if result["methods"] else None
    for row in result["methods"]:
        tuned = _knobs(row["tuned"])
        cells = [_pct(row["eval"][t]["accuracy"]) for t in tasks]
        norm = _ci(row)
        if row["normalized_accuracy"] == best:
            norm = f"**{norm}**"
        m = row["measure"]
        mem = f"{m['peak_rss_mb']:.0f}" + (f" (GPU {m['peak_gpu_mb']:.0f})" if m.get("peak_gpu_mb") else "")
        lines.append(f"| {row['method']} | {tuned} | " + " | ".join(cells)
                     + f" | {_pct(row['mean_accuracy'])} | {norm} | {m['merge_s']:.1f} | {mem} |")
    return "\n".join(lines)


def _report_tokens(path: str) -> int:
    """Calibration tokens the merge used, from the com_report.json it wrote."""
    report = json.loads((Path(path) / "com_report.json").read_text())
    return sum(e["calibration"]["tokens"] for e in report["experts"])


def cost_table(result: dict) -> str:
    """Where our merges spend their time, and their calibration throughput."""
    from ..method.timing import ORDER

    rows = [r for r in result["methods"] if r["merge_method"] == "chain_of_merges"
            and (Path(r["path"]) / "com_report.json").exists()]
    if not rows:
        return ""
    ties = next((r for r in result["methods"] if r["method"] == "ties"), None)
    lines = ["| method | merge s | " + " | ".join(f"{p} s" for p in ORDER)
             + " | calibration tokens | tokens/s | x ties time | peak RSS MB |",
             "|---" * (len(ORDER) + 6) + "|"]
    for r in rows:
        m = r["measure"]
        tokens = _report_tokens(r["path"])
        phases = " | ".join(f"{(m.get('phases') or {}).get(p, 0):.1f}" for p in ORDER)
        ratio = f"{m['merge_s'] / ties['measure']['merge_s']:.1f}" if ties else "-"
        lines.append(f"| {r['method']} | {m['merge_s']:.1f} | {phases} | {tokens} | "
                     f"{tokens / m['merge_s']:.0f} | {ratio} | {m['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def ablation_table(rows: List[dict]) -> str:
    if not rows:
        return ""
    alphas = list(dict.fromkeys(sorted((r["alpha"] for r in rows), key=lambda a: (isinstance(a, str), a))))
    counts = sorted({r["num_samples"] for r in rows})
    by: Dict[tuple, dict] = {(r["alpha"], r["num_samples"]): r for r in rows}
    lines = ["| num_samples \\ alpha | " + " | ".join(f"{a:g}" if not isinstance(a, str) else a for a in alphas)
             + " |", "|---" * (len(alphas) + 1) + "|"]
    for n in counts:
        lines.append(f"| {n} | " + " | ".join(_ci(by[(a, n)]) for a in alphas) + " |")
    return "\n".join(lines)


def candidates_table(result: dict) -> str:
    """Fixed configurations: parameters, val and eval normalized accuracy with intervals."""
    lines = ["| candidate | parameters | val normalized [95% CI] | eval normalized [95% CI] | merge s |",
             "|---|---|---|---|---|"]
    for row in result["candidates"]:
        params = _knobs({k: v for k, v in row["params"].items()})
        val = _ci(row["val"]) if "val" in row else "-"
        lines.append(f"| {row['name']} | {params} | {val} | {_ci(row['eval'])} | "
                     f"{row['measure']['merge_s']:.1f} |")
    return "\n".join(lines)


def budget_table(result: dict) -> str:
    """Normalized accuracy (eval) per calibration budget, one column per variant."""
    rows = result["budget"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    counts = sorted({r["num_samples"] for r in rows})
    by = {(r["variant"], r["num_samples"]): r for r in rows}
    lines = ["| num_samples | tokens per expert (mean) | " + " | ".join(variants) + " |",
             "|---" * (len(variants) + 2) + "|"]
    for n in counts:
        tokens = next(by[(v, n)]["tokens_per_expert"] for v in variants if (v, n) in by)
        mean_tokens = sum(tokens) / len(tokens) if tokens else float("nan")
        cells = [_ci(by[(v, n)]["eval"]) if (v, n) in by else "-" for v in variants]
        lines.append(f"| {n} | {mean_tokens:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_budget(result: dict, path: Path) -> None:
    """Normalized accuracy against calibration tokens per expert (log x), with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = result["budget"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((sum(r["tokens_per_expert"]) / len(r["tokens_per_expert"]), r["eval"])
                     for r in rows if r["variant"] == variant)
        xs = [x for x, _ in pts]
        ys = [100 * e["normalized_accuracy"] for _, e in pts]
        err = [[y - 100 * e["normalized_ci"][0] for y, (_, e) in zip(ys, pts)],
               [100 * e["normalized_ci"][1] - y for y, (_, e) in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("calibration tokens per expert")
    ax.set_ylabel("normalized accuracy (%), eval, 95% CI")
    ax.set_title(f"Calibration budget ({result['preset']} zoo)")
    _finish(fig, ax, path)


def _finish(fig, ax, path: Path, **legend) -> None:
    """Legend, layout, PNG, and the figure closed (pyplot keeps every open one)."""
    import matplotlib.pyplot as plt

    ax.legend(**{"fontsize": 8, **legend})
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2))


def plot_quality(result: dict, path: Path) -> None:
    """Grouped bars: per-task normalized accuracy (merged / expert) and the mean, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    experts = result["experts_eval"]
    rows = result["methods"]
    groups = [*tasks, "mean"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5.2))
    for i, row in enumerate(rows):
        vals = [100 * row["eval"][t]["accuracy"] / experts[t] if experts[t] else 0 for t in tasks]
        vals.append(100 * row["normalized_accuracy"])
        cis = [row.get("task_ci", {}).get(t) for t in tasks] + [row.get("normalized_ci")]
        low = [v - 100 * c[0] if c else 0 for v, c in zip(vals, cis)]
        high = [100 * c[1] - v if c else 0 for v, c in zip(vals, cis)]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width, label=row["method"], yerr=[low, high], capsize=1.5,
               error_kw={"elinewidth": 0.7, "ecolor": "black"})
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("normalized accuracy (%), 95% bootstrap CI")
    ax.set_title(f"Merging the {result['preset']} zoo's {len(tasks)} experts (eval split)")
    _finish(fig, ax, path, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08),
            frameon=False)


def shift_by_layer(result: dict) -> Dict[str, List[float]]:
    """Per our merge: the covariate shift entering each layer (and the head), mean over experts."""
    out = {}
    for row in result["methods"]:
        path = Path(row["path"]) / "com_report.json"
        if row["merge_method"] != "chain_of_merges" or not path.exists():
            continue
        layers = json.loads(path.read_text())["layers"]
        out[row["method"]] = [sum(v for v in layer["covariate_shift"]) / len(layer["covariate_shift"])
                              for layer in layers]
    return out


def shift_table(shifts: Dict[str, List[float]]) -> str:
    n = len(next(iter(shifts.values())))
    cols = [f"layer {i}" for i in range(n - 1)] + ["head"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (n + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for name, vals in shifts.items()]
    return "\n".join(lines)


def plot_shift(result: dict, path: Path) -> bool:
    """The report's covariate shift per layer, RegMean vs the chain variants; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = shift_by_layer(result)
    if not shifts:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in shifts.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    n = len(next(iter(shifts.values())))
    step = max(1, (n - 1) // 10)  # about ten labelled layers, whatever the depth
    ticks = [*range(0, n - 1, step), n - 1]
    ax.set_xticks(ticks, [str(i) for i in ticks[:-1]] + ["head"])
    ax.set_xlabel("hidden states entering layer")
    ax.set_ylabel("covariate shift (mean over experts)")
    ax.set_title(f"Merged vs each expert's own activations ({result['preset']} zoo, com_report.json)")
    _finish(fig, ax, path)
    return True
