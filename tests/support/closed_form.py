"""RegMean / CoM closed forms recomputed independently inside the tests."""

from __future__ import annotations

import json
from typing import Dict, List, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def texts_of(path: str) -> List[str]:
    with open(path, encoding="utf-8") as fp:
        return [json.loads(line)["text"] for line in fp if line.strip()]


def captured_inputs(model_dir: str, texts: Sequence[str], modules: Sequence[str],
                    max_seq_len: int = 512) -> Dict[str, torch.Tensor]:
    """Inputs of ``modules`` (forward hooks), one unpadded sequence at a time."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = {m: [] for m in modules}
    handles = [
        model.get_submodule(m).register_forward_hook(
            lambda mod, args, out, m=m: rows[m].append(args[0][0].detach())
        )
        for m in modules
    ]
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"][:max_seq_len]
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return {m: torch.cat(r) for m, r in rows.items()}


def shrink(g: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def regmean(xs, ws, alpha, ridge, weights=None) -> torch.Tensor:
    """(sum_t w_t G~_t + eps I)^-1 sum_t w_t G~_t W_t^T, returned as [out, in]."""
    weights = weights or [1.0] * len(xs)
    gs = [shrink(x.double().T @ x.double() / x.shape[0], alpha) for x in xs]
    lhs = sum(w * g for w, g in zip(weights, gs))
    rhs = sum(w * g @ wt.double().T for w, g, wt in zip(weights, gs, ws))
    eps = ridge * lhs.diagonal().mean()
    return torch.linalg.solve(lhs + eps * torch.eye(lhs.shape[0], dtype=lhs.dtype), rhs).T


def match_expert(xs, zs, ws, ridge, weights=None) -> torch.Tensor:
    weights = weights or [1.0] * len(xs)
    lhs = sum(w * x.double().T @ x.double() / x.shape[0] for w, x in zip(weights, xs))
    rhs = sum(w * x.double().T @ (z.double() @ wt.double().T) / x.shape[0]
              for w, x, z, wt in zip(weights, xs, zs, ws))
    eps = ridge * lhs.diagonal().mean()
    return torch.linalg.solve(lhs + eps * torch.eye(lhs.shape[0], dtype=lhs.dtype), rhs).T


def assert_close(actual, expected, rtol=1e-5):
    expected = expected.to(actual.dtype)
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
