"""How CoM's cost grows with depth: ``python -m mergekit_com.bench scale``.

Pico Llamas of 4, 8, 16 and 32 layers, same width and calibration, K experts
each (the base plus seeded perturbations). For each depth, in one run: CoM
(wall time, per-phase breakdown, peak RSS), mergekit's ``ties`` on the same
models, and the naive chain that re-runs the merged prefix for every layer.
Every merge uses ``--out-shard-size`` so mergekit's writer never buffers more
than one small shard (its default buffers up to 5 GB, for every method).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .measure import run_yaml

LOG = logging.getLogger(__name__)

SHAPE = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)
EXPERTS = 3
SAMPLES, SEQ_LEN = 16, 64  # per expert
SHARD = "32M"


def _text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def build_models(root: Path, layers: int, seed: int = 0) -> Dict[str, object]:
    """base, experts and calibration files for one depth (cached on disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..zoo.tasks import ALPHABET
    from ..zoo.tokenizer import build_char_tokenizer

    root = Path(root)
    done = root / "models.json"
    if done.exists():
        return json.loads(done.read_text())
    tok = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, max_position_embeddings=SEQ_LEN + 8,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    paths = {"base": str(root / "base"), "experts": [], "calibration": []}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(EXPERTS):
        g = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for name, p in base.named_parameters():  # a fine-tune-sized nudge of every tensor
                p.copy_(state[name] + 0.05 * state[name].std() * torch.randn(p.shape, generator=g))
        path = root / f"expert{i}"
        base.save_pretrained(path)
        tok.save_pretrained(path)
        rng = random.Random(seed * 100 + i)
        calib = root / f"expert{i}.jsonl"
        calib.write_text("".join(json.dumps({"text": _text(rng, ALPHABET, SEQ_LEN)}) + "\n"
                                 for _ in range(SAMPLES)))
        paths["experts"].append(str(path))
        paths["calibration"].append(str(calib))
    done.write_text(json.dumps(paths))
    return paths


def configs(models: Dict[str, object]) -> Dict[str, dict]:
    com = {
        "merge_method": "chain_of_merges", "base_model": models["base"], "dtype": "float32",
        "models": [{"model": m, "parameters": {"calibration": c}}
                   for m, c in zip(models["experts"], models["calibration"])],
        "parameters": {"chain": "module", "num_samples": SAMPLES, "max_seq_len": SEQ_LEN},
    }
    ties = {
        "merge_method": "ties", "base_model": models["base"], "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models["experts"]],
    }
    return {"com": com, "ties": ties}


def run(out: Path, depths: Sequence[int] = (4, 8, 16, 32), threads: int = 1, device: str = "cpu",
        naive_up_to: int = 32) -> dict:
    from safetensors.torch import load_file

    out = Path(out)
    args = ["--quiet", "--num-threads", str(threads), "--out-shard-size", SHARD]
    if device.startswith("cuda"):
        args += ["--cuda", "--device", device]
    rows: List[dict] = []
    start = time.perf_counter()
    for layers in depths:
        models = build_models(out / "models" / f"L{layers}", layers)
        cfg = configs(models)
        row: Dict[str, object] = {"layers": layers}
        # ties first: it also warms the page cache with every input file
        for name, config, env in (("ties", cfg["ties"], None), ("com", cfg["com"], None),
                                  ("naive", cfg["com"], {"MERGEKIT_COM_BENCH_NAIVE": "1"})):
            if name == "naive" and layers > naive_up_to:
                continue
            dest = out / "merges" / f"{name}_L{layers}"
            m = run_yaml(config, dest, args, env=env)
            row[name] = m.to_json()
            LOG.info("L=%d %-5s %.1f s, peak RSS %.0f MB", layers, name, m.merge_s, m.peak_rss_mb)
        if "naive" in row:  # the reference must produce the very same model
            a = {k: v for f in sorted((out / "merges" / f"com_L{layers}").glob("*.safetensors"))
                 for k, v in load_file(f).items()}
            b = {k: v for f in sorted((out / "merges" / f"naive_L{layers}").glob("*.safetensors"))
                 for k, v in load_file(f).items()}
            row["naive_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        for name in ("com", "ties", "naive"):
            shutil.rmtree(out / "merges" / f"{name}_L{layers}", ignore_errors=True)
        rows.append(row)
    tokens = EXPERTS * SAMPLES * SEQ_LEN
    return {"depths": list(depths), "shape": SHAPE, "experts": EXPERTS, "calibration_tokens": tokens,
            "device": device, "threads": threads, "rows": rows, "seconds": time.perf_counter() - start}


def table(result: dict) -> str:
    from ..method.timing import ORDER

    lines = ["| layers | CoM s | " + " | ".join(ORDER) + " | ties s | CoM / ties | naive s | naive / CoM "
             "| CoM peak RSS MB | ties peak RSS MB |",
             "|---" * (len(ORDER) + 8) + "|"]
    for r in result["rows"]:
        com, ties = r["com"], r["ties"]
        phases = " | ".join(f"{com['phases'][p]:.2f}" for p in ORDER)
        naive = r.get("naive")
        nv = f"{naive['merge_s']:.1f} | {naive['merge_s'] / com['merge_s']:.2f}" if naive else "- | -"
        lines.append(f"| {r['layers']} | {com['merge_s']:.1f} | {phases} | {ties['merge_s']:.1f} | "
                     f"{com['merge_s'] / ties['merge_s']:.1f} | {nv} | {com['peak_rss_mb']:.0f} | "
                     f"{ties['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def ratios(result: dict) -> Dict[str, float]:
    by = {r["layers"]: r for r in result["rows"]}
    out = {}
    if 8 in by and 32 in by:
        out["time_32_over_8"] = by[32]["com"]["merge_s"] / by[8]["com"]["merge_s"]
        out["rss_32_over_8"] = by[32]["com"]["peak_rss_mb"] / by[8]["com"]["peak_rss_mb"]
    return out
