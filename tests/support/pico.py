"""Pico models, tokenizer and calibration files built locally for the tests."""

from __future__ import annotations

import json
import os
import string
from typing import Callable, Dict, Optional

import torch

CHARS = string.ascii_letters + string.digits + string.punctuation + " "
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(tokens=None):
    """A character-level fast tokenizer (BOS added), no download needed.

    ``tokens``: the vocabulary in id order (default: specials, then ``CHARS``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tokens or SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    )
    return fast


VOCAB = len(SPECIALS) + len(CHARS)


def llama_config(layers: int = 2, hidden: int = 32, arch: str = "llama", **kw):
    from transformers import AutoConfig

    args = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    args.update(kw)
    return AutoConfig.for_model(arch, **args)


def save_model(path: str, config, state: Dict[str, torch.Tensor], tokenizer=None) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


def random_state(config, seed: int) -> Dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # make norms non-trivial too
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def perturbed(
    state: Dict[str, torch.Tensor], seed: int, scale: float = 0.05,
    only: Optional[Callable[[str], bool]] = None,
) -> Dict[str, torch.Tensor]:
    """An 'expert': the base plus a seeded perturbation (of the selected tensors)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and (only is None or only(k)):
            v = v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
        out[k] = v.clone()
    return out


def write_jsonl(path: str, texts) -> str:
    with open(path, "w", encoding="utf-8") as fp:
        for t in texts:
            fp.write(json.dumps({"text": t}) + "\n")
    return path


def sample_texts(seed: int, n: int = 12, lo: int = 8, hi: int = 40):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        idx = torch.randint(0, len(CHARS), (length,), generator=g)
        out.append("".join(CHARS[i] for i in idx))
    return out


def is_linear_weight(name: str) -> bool:
    return "proj" in name or "lm_head" in name


def build_experts(root: str, n_experts: int = 2, layers: int = 2, hidden: int = 32,
                  only: Optional[Callable[[str], bool]] = None, **cfg_kw):
    """base + experts + one calibration file per expert under ``root``."""
    config = llama_config(layers=layers, hidden=hidden, **cfg_kw)
    base = random_state(config, seed=0)
    paths = {"base": save_model(os.path.join(root, "base"), config, base)}
    for i in range(n_experts):
        name = f"expert{i}"
        paths[name] = save_model(os.path.join(root, name), config,
                                 perturbed(base, seed=100 + i, scale=0.3, only=only))
        paths[f"{name}_data"] = write_jsonl(os.path.join(root, f"{name}.jsonl"),
                                            sample_texts(seed=200 + i))
    return paths
