"""A minimal causal-LM training loop (plain torch: far less overhead than Trainer)."""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .tasks import Sample


def encode_samples(tokenizer, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of BOS+prompt+answer+EOS, and a mask of the answer/EOS tokens.

    Prompt and answer are tokenized separately (as the evaluation does), so the
    answer boundary is the same at train and test time for any tokenizer. A prompt
    given as chat messages is rendered with the chat template up to the assistant's
    turn (``evaluate.prompt_ids``).
    """
    from ..evaluate import prompt_ids

    rows: List[List[int]] = []
    answer_starts: List[int] = []
    for prompt, answer in samples:
        p = prompt_ids(tokenizer, prompt)
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + a)
        answer_starts.append(len(p))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, answer_starts)):
        ids[i, : len(row)] = torch.tensor(row)
        answer_mask[i, start : len(row)] = True
    return ids, answer_mask


def train_lm(
    model,
    tokenizer,
    samples: Sequence[Sample],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    answer_only: bool,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.1,
) -> List[float]:
    """Train in place on batches drawn with replacement; returns the loss curve.

    answer_only=False is language modelling on the whole text (pretraining);
    answer_only=True is SFT: the loss is on the answer (+EOS) tokens only.
    """
    ids, answer_mask = encode_samples(tokenizer, samples)
    attn = ids != tokenizer.pad_token_id
    attn[:, 0] = True  # BOS may share the pad id in foreign tokenizers
    target_mask = answer_mask if answer_only else attn
    labels = ids.masked_fill(~target_mask, -100)

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(steps * warmup_frac))
    # linear warmup, cosine decay to 10% of the peak
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup
        if s < warmup
        else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )
    dev = next(model.parameters()).device  # batches follow the model (cpu or cuda)
    model.train()
    losses: List[float] = []
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (batch_size,), generator=gen)
        width = int(attn[idx].sum(1).max())  # trim the padding columns of this batch
        out = model(
            input_ids=ids[idx, :width].to(dev),
            attention_mask=attn[idx, :width].long().to(dev),
            labels=labels[idx, :width].to(dev),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses
