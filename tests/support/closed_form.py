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


def captured_sequences(model_dir: str, texts: Sequence[str], modules: Sequence[str],
                       max_seq_len: int = 512) -> Dict[str, List[torch.Tensor]]:
    """Like captured_inputs, but one [tokens, in] tensor per text."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tok(t)["input_ids"][:max_seq_len]) for t in texts]
    whole = captured_inputs(model_dir, texts, modules, max_seq_len)
    return {m: list(x.split(lengths)) for m, x in whole.items()}


def shrink(g: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def ledoit_wolf_alpha(seqs: Sequence[torch.Tensor]) -> float:
    """1 - the Schäfer-Strimmer (target D) intensity, entry by entry over sequences."""
    xs = [s.double() for s in seqs]
    n = torch.tensor([float(len(s)) for s in xs], dtype=torch.float64)
    g = sum(s.T @ s for s in xs) / n.sum()
    per_seq = torch.stack([s.T @ s / len(s) for s in xs])
    var = (n[:, None, None] * (per_seq - g).square()).sum(0) / (n.sum() * (len(xs) - 1))
    off = ~torch.eye(g.shape[0], dtype=torch.bool)
    return 1.0 - min(1.0, max(0.0, float(var[off].sum() / g[off].square().sum())))


def blend_solution(xs, zs, ws, alphas, share, ridge, weights=None) -> torch.Tensor:
    """(sum_t w_t G~_t + eps I)^-1 sum_t w_t ((1-b) G~_t + b C~_t) W_t^T, as [out, in]."""
    weights = weights or [1.0] * len(xs)
    gs = [shrink(x.double().T @ x.double() / x.shape[0], a) for x, a in zip(xs, alphas)]
    cs = [shrink(x.double().T @ z.double() / x.shape[0], a) for x, z, a in zip(xs, zs, alphas)]
    lhs = sum(w * g for w, g in zip(weights, gs))
    rhs = sum(w * ((1 - share) * g + share * c) @ wt.double().T
              for w, g, c, wt in zip(weights, gs, cs, ws))
    eps = ridge * lhs.diagonal().mean()
    return torch.linalg.solve(lhs + eps * torch.eye(lhs.shape[0], dtype=lhs.dtype), rhs).T


def packed_folds(lengths: Sequence[int], batch_size: int, max_seq_len: int = 512) -> List[int]:
    """The held-out fold of each sequence (in file order), as the walk assigns them:
    sequences sorted longest first (ties in file order) are packed into batches of at
    most batch_size * max_seq_len positions (padding included); within batch b the
    sequences alternate between the folds, starting at fold b % 2."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    folds, batch, rows, width = [0] * len(lengths), -1, 0, 0
    for i in order:
        if batch < 0 or (rows + 1) * width > batch_size * max_seq_len:
            batch, rows, width = batch + 1, 0, lengths[i]
        folds[i] = (batch + rows) % 2
        rows += 1
    return folds


def held_out_share(x_seqs, z_seqs, ws, alphas, ridge, folds=None) -> float:
    """The blend whose fit on one fold of sequences best reproduces each expert's own
    outputs on the other, found by a fine grid search. ``folds``: per expert, each
    sequence's fold (default: alternating in file order)."""
    folds = folds or [[i % 2 for i in range(len(s))] for s in x_seqs]

    def part(seqs, t, f):
        return torch.cat([s for s, g in zip(seqs, folds[t]) if g == f])

    def loss(share):
        total = 0.0
        for train, test in ((0, 1), (1, 0)):
            xs = [part(s, t, train) for t, s in enumerate(x_seqs)]
            zs = [part(s, t, train) for t, s in enumerate(z_seqs)]
            v = blend_solution(xs, zs, ws, alphas, share, ridge)
            for t, w in enumerate(ws):
                x, z = part(x_seqs[t], t, test).double(), part(z_seqs[t], t, test).double()
                total += float(((x @ v.T - z @ w.double().T) ** 2).sum() / x.shape[0])
        return total

    return min((i / 1000 for i in range(1001)), key=loss)


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
