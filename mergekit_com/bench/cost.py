"""CoM against its compute floor: ``python -m mergekit_com.bench cost``.

For each model family, in one run and at each thread count:

* **floor** = ``forward`` (a plain transformers forward of one expert's decoder
  over every calibration token of every expert; no ``lm_head``, since CoM never
  computes logits) + ``gram`` (``X^T X`` in float32, one product per batch, for
  the input of every group of linears of every layer and of the head, over
  every expert's tokens) + ``io`` (mergekit's ``linear`` on the same models
  through ``mergekit-yaml``: reading and writing every tensor);
* **CoM** through ``mergekit-yaml``, with its phases: with ``objective: regmean``
  (one forward per token and layer: the floor's own shape), with every default
  (``objective: blend``: the experts' own models run too, for the targets), and
  with ``objective: match_expert``;
* in rounds: each round measures the floor's parts at each thread count, then runs every
  merge at each thread count back to back; the floor is measured once more after the last
  round, and each part and each merge keeps its fastest measurement. On a shared machine
  the speed drifts by 20-30% over seconds to minutes (the same tiny-zoo merge took 0.85 s
  or 1.3 s at random, a pico merge 29 s in one round and 40 s in the next), so the repeats
  are spread over the run rather than run back to back, the floor and the merges are
  treated alike, and a merge's 1- and 2-thread runs come one after the other (the
  speed-up compares measurements seconds apart). How many rounds follows from the first
  one's length per thread count (``ROUNDS``): five for the zoos, three for pico, one for
  SmolLM2;
* **the targets' floor**, what any merge fitting the experts' own outputs must
  do (the defaults, match_expert): a second ``forward`` (each expert's own
  model over its tokens) and ``cross`` on top of the floor: per batch and group
  the targets' moment, ``X^T Z`` (a full product), or ``X^T Y`` with ``Y`` the
  group's outputs where they are no wider than its input (``o_proj``,
  ``down_proj``), whichever is smaller: the solve needs only ``(X^T Z) W^T``.

Every merge runs in its own child process (``measure.run_yaml``); the floor's
forward and Grams run in this process on the same batches. Every process runs with
the glibc malloc thresholds our merges set (``method/allocator.py``): without them, the
floor depended on what this process had run before (the tiny zoo's forward at 2 threads
took 0.067 s run first, 0.043 s after pico's floor, by when glibc had raised them).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ..method.allocator import tune_malloc
from .measure import Measurement, run_yaml

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str
    experts: int = 0
    samples: int = 128  # per expert
    seq_len: int = 512  # tokens kept per sample
    batch_size: int = 8
    zoo: str = ""  # a built zoo preset: its experts and calibration files, default parameters


FAMILIES = {
    # the reference: 4 pico-Llama experts, 8 layers, hidden 512, MLP 1536, 24k tokens
    "pico": Family("pico", experts=4, samples=24, seq_len=256),
    # SmolLM2-135M-Instruct (30 layers, hidden 576, MLP 1536), 4 experts, 32k tokens
    "smollm2": Family("smollm2", experts=4, samples=32, seq_len=256),
}
# (a first round at least this long in seconds per thread count, rounds in all): a second
# round of SmolLM2 would add most of an hour; pico's speed drifted 20-30% between rounds
ROUNDS = ((600.0, 1), (60.0, 3), (0.0, 5))
PICO_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8)


def _base(family: Family):
    if family.name == "smollm2":
        from ..zoo.smollm2 import load_smollm2

        return load_smollm2()
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=family.seq_len + 8,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **PICO_SHAPE)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tok


def family(name: str) -> Family:
    """``pico``, ``smollm2``, or ``zoo:<preset>`` (a zoo built under --zoo-cache)."""
    if name.startswith("zoo:"):
        return Family(name, zoo=name[4:])
    return FAMILIES[name]


def zoo_paths(cache: Path, preset: str) -> Dict[str, object]:
    """A built zoo's experts and calibration files."""
    from ..zoo.build import ZooManifest

    root = Path(cache) / preset
    if not (root / "zoo.json").exists():
        raise FileNotFoundError(f"no {preset} zoo in {cache}: build it with "
                                f"python -m mergekit_com.zoo --preset {preset}")
    zoo = ZooManifest.load(root)
    return {"experts": [str(p) for p in zoo.experts.values()],
            "calibration": [str(zoo.data_file(t, "calib")) for t in zoo.tasks]}


def build(root: Path, family: Family) -> Dict[str, object]:
    """Base, experts (seeded fine-tune-sized perturbations) and calibration files, cached."""
    from ..zoo.tasks import ALPHABET

    done = root / "models.json"
    if done.exists():
        return json.loads(done.read_text())
    model, tok = _base(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths: Dict[str, object] = {"experts": [], "calibration": []}
    for i in range(family.experts):
        g = torch.Generator().manual_seed(1 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name] + 0.05 * state[name].std() * torch.randn(p.shape, generator=g))
        path = root / f"expert{i}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        rng = random.Random(i)
        # long enough that every record is cut at max_seq_len: exactly samples x seq_len tokens
        lines = ["".join(rng.choice(ALPHABET) for _ in range(4 * family.seq_len))
                 for _ in range(family.samples)]
        calib = root / f"expert{i}.jsonl"
        calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
        paths["experts"].append(str(path))
        paths["calibration"].append(str(calib))
    done.write_text(json.dumps(paths))
    return paths


def configs(paths: Dict[str, object], family: Family) -> Dict[str, dict]:
    def ours(**extra) -> dict:
        return {
            "merge_method": "chain_of_merges", "dtype": "float32",
            "models": [{"model": m, "parameters": {"calibration": c}}
                       for m, c in zip(paths["experts"], paths["calibration"])],
            "parameters": {"num_samples": family.samples, "max_seq_len": family.seq_len,
                           "batch_size": family.batch_size, **extra},
        }

    linear = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in paths["experts"]]}
    return {"linear": linear, "regmean": ours(objective="regmean", alpha=0.9), "com": ours(),
            "match_expert": ours(objective="match_expert")}


def _batches(paths: Dict[str, object], family: Family) -> List[Dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from ..io.calibration import load_calibration, make_batches

    out = []
    for model, calib in zip(paths["experts"], paths["calibration"]):
        tok = AutoTokenizer.from_pretrained(model)
        cal = load_calibration(calib, tok, family.samples, family.seq_len)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out += [{"input_ids": ids, "attention_mask": mask}
                for ids, mask in make_batches(cal.sequences, family.batch_size, pad,
                                              max_tokens=family.batch_size * family.seq_len)]
    return out


def _group_widths(model) -> List[Tuple[int, int]]:
    """(input width, output widths summed) of every group of linears sharing an input
    (q/k/v, o, gate/up, down: both families are Llamas), and of the head."""
    widths = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj],
                      [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]):
            widths.append((group[0].in_features, sum(m.out_features for m in group)))
    return widths + [(model.config.hidden_size, model.config.vocab_size)]


def floor(paths: Dict[str, object], family: Family) -> Dict[str, float]:
    """Seconds of the floor's forward and Gram products, in this process."""
    from transformers import AutoModelForCausalLM

    batches = _batches(paths, family)
    model = AutoModelForCausalLM.from_pretrained(paths["experts"][0], dtype=torch.float32).eval()
    with torch.no_grad():
        model.model(**batches[0], use_cache=False)  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model.model(**batch, use_cache=False)
        forward = time.perf_counter() - start
        gram = cross = 0.0
        for width, outputs in _group_widths(model):
            for batch in batches:
                tokens = int(batch["attention_mask"].sum())
                x, z = torch.randn(tokens, width), torch.randn(tokens, min(width, outputs))
                start = time.perf_counter()
                x.T @ x
                middle = time.perf_counter()
                x.T @ z
                gram += middle - start
                cross += time.perf_counter() - middle
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"forward": forward, "gram": gram, "cross": cross, "tokens": tokens}


def rounds_after(first_round_s: float) -> int:
    """How many rounds in all, given the first one's wall time (``ROUNDS``)."""
    return next(n for longer, n in ROUNDS if first_round_s >= longer)


def fastest(measurements: Sequence[Measurement]) -> dict:
    """One merge's measurements (one per round): the fastest, and how many there were."""
    best = min(measurements, key=lambda m: m.merge_s)
    return {**best.to_json(), "runs": len(measurements)}


def faster(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    """Two measurements of the floor's parts: each part's shorter time (tokens: the same)."""
    return {k: min(a[k], b[k]) if k != "tokens" else a[k] for k in a}


def measure(paths: Dict[str, object], spec: Family, cfgs: Dict[str, dict], threads: Sequence[int],
            out: Path) -> List[Dict[str, object]]:
    """One family, in rounds: a row per thread count, with the floor's parts and each
    merge's fastest measurement. A round measures the floor at each thread count, then
    each merge at each thread count back to back, so a merge's 1- and 2-thread runs are
    seconds to a minute apart, not a whole run."""
    floors: Dict[int, List[Dict[str, float]]] = {t: [] for t in threads}
    merges = {t: {label: [] for label in cfgs} for t in threads}
    total, rounds, start = 1, 0, time.perf_counter()
    while rounds < total:
        rounds += 1
        for t in threads:
            torch.set_num_threads(t)
            floors[t].append(floor(paths, spec))
        for label, cfg in cfgs.items():
            for t in threads:
                dest = out / "merges" / f"{spec.name.replace(':', '_')}_{label}_t{t}"
                merges[t][label].append(run_yaml(cfg, dest, ["--quiet", "--num-threads", str(t)]))
                shutil.rmtree(dest, ignore_errors=True)
                LOG.info("%s, %d thread(s), round %d: %s %.1f s", spec.name, t, rounds, label,
                         merges[t][label][-1].merge_s)
        if rounds == 1:  # per thread count, as the rounds were measured before (ROUNDS)
            total = rounds_after((time.perf_counter() - start) / len(threads))
    rows = []
    for t in threads:  # the floor once more after the last round
        torch.set_num_threads(t)
        floors[t].append(floor(paths, spec))
        row: Dict[str, object] = {"family": spec.name, "threads": t, "rounds": total}
        row.update(functools.reduce(faster, floors[t]))
        row.update({label: fastest(m) for label, m in merges[t].items()})
        row["floor"] = row["forward"] + row["gram"] + row["linear"]["merge_s"]
        row["targets_floor"] = row["floor"] + row["forward"] + row["cross"]
        rows.append(row)
    return rows


def run(out: Path, families: Sequence[str] = ("pico", "smollm2"),
        threads: Sequence[int] = (1, 2), zoo_cache: Path = Path("zoo_cache")) -> dict:
    out = Path(out)
    tune_malloc()  # as in every merge measured (module docstring)
    rows = []
    start = time.perf_counter()
    for name in families:
        spec = family(name)
        paths = zoo_paths(zoo_cache, spec.zoo) if spec.zoo else build(out / "models" / name, spec)
        for row in measure(paths, spec, configs(paths, spec), threads, out):
            rows.append(row)
            LOG.info("%s, %d thread(s): %d rounds, floor %.1f s, defaults %.1f s", name,
                     row["threads"], row["rounds"], row["floor"], row["com"]["merge_s"])
    return {"rows": rows, "seconds": time.perf_counter() - start}


def table(result: dict) -> str:
    from ..method.timing import ORDER

    lines = ["| model | threads | tokens | floor: forward s | gram s | io (linear) s | floor s "
             "| CoM regmean s | regmean / floor | regmean phases: " + ", ".join(ORDER)
             + " | cross s | targets' floor s | CoM defaults s | defaults / floor | defaults / targets' floor "
             "| defaults phases | match_expert s | match_expert / targets' floor "
             "| match_expert / defaults |",
             "|---" * 19 + "|"]
    for r in result["rows"]:
        reg, com, match = r["regmean"], r["com"], r["match_expert"]
        targets = r["targets_floor"]
        lines.append(
            f"| {r['family']} | {r['threads']} | {r['tokens']} | {r['forward']:.1f} | {r['gram']:.1f} "
            f"| {r['linear']['merge_s']:.1f} | {r['floor']:.1f} | {reg['merge_s']:.1f} "
            f"| {reg['merge_s'] / r['floor']:.2f} | {_phases(reg)} | {r['cross']:.1f} | {targets:.1f} "
            f"| {com['merge_s']:.1f} | {com['merge_s'] / r['floor']:.2f} | {com['merge_s'] / targets:.2f} "
            f"| {_phases(com)} | {match['merge_s']:.1f} | {match['merge_s'] / targets:.2f} "
            f"| {match['merge_s'] / com['merge_s']:.2f} |")
    return "\n".join(lines)


def _phases(merge: dict) -> str:
    from ..method.timing import ORDER

    return ", ".join(f"{merge['phases'][p]:.1f}" for p in ORDER)


def speedups(result: dict) -> Dict[str, Dict[str, float]]:
    """Time at 1 thread over time at 2, per family: of the floor (what two cores give this
    work), of CoM with ``objective: regmean`` and of CoM with every default."""
    by = {(r["family"], r["threads"]): r for r in result["rows"]}
    return {f: {"floor": by[(f, 1)]["floor"] / by[(f, 2)]["floor"],
                "regmean": by[(f, 1)]["regmean"]["merge_s"] / by[(f, 2)]["regmean"]["merge_s"],
                "defaults": by[(f, 1)]["com"]["merge_s"] / by[(f, 2)]["com"]["merge_s"]}
            for f, t in by if t == 1 and (f, 2) in by}
