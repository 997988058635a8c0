"""Pico configurations of the architectures CoM supports, built with transformers' own
config classes (nothing downloaded), and two-expert zoos of them."""

from __future__ import annotations

import os

from transformers import AutoConfig

from tests.support import pico

# model_type -> (config overrides, tie_word_embeddings as in the family's small checkpoints)
ARCHS = {
    "llama": ({}, False),
    "mistral": ({"sliding_window": 16}, False),
    "qwen2": ({}, True),  # q/k/v biases
    "qwen3": ({"head_dim": 8}, True),  # q/k norms
    "gemma2": ({"head_dim": 8, "sliding_window": 16}, True),  # sliding/global layers, soft-capping
    "gemma3_text": ({"head_dim": 8, "sliding_window": 16}, True),  # two rotary embeddings
    "phi3": ({}, False),  # fused qkv_proj and gate_up_proj
    "olmo2": ({}, False),  # post-norms only
    "gpt2": (None, True),  # Conv1D linears: [in, out] weights
}


def arch_config(arch: str, layers: int = 2, hidden: int = 32):
    overrides, tie = ARCHS[arch]
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=pico.VOCAB, n_embd=hidden, n_layer=layers, n_head=4,
            n_positions=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=tie,
        )
    return pico.llama_config(layers=layers, hidden=hidden, arch=arch,
                             tie_word_embeddings=tie, **overrides)


def build_arch_experts(root: str, arch: str, n_experts: int = 2, layers: int = 2):
    """Like ``pico.build_experts`` for any architecture in ``ARCHS``."""
    config = arch_config(arch, layers=layers)
    base = pico.random_state(config, seed=0)
    paths = {"config": config}
    for i in range(n_experts):
        name = f"expert{i}"
        paths[name] = pico.save_model(os.path.join(root, name), config,
                                      pico.perturbed(base, seed=100 + i, scale=0.3))
        paths[f"{name}_data"] = pico.write_jsonl(os.path.join(root, f"{name}.jsonl"),
                                                 pico.sample_texts(seed=200 + i))
    return paths
