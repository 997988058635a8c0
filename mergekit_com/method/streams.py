"""The hidden states entering the current layer, per expert and calibration batch.

Two streams per expert t:
  * ``merged``: in the merged model so far: the chain's inputs (``chain:
    module`` / ``block``) and the activations the output model will have;
  * ``own``: in expert t's unmerged model: RegMean's inputs (``chain:
    none``) and the targets of ``objective: match_expert`` and ``blend``.
Each is kept for every batch only where the chain or objective reads it.
The merge report's covariate shift compares the two: on every batch when
both are kept (or with ``exact_shift``), else on a small ``sample`` batch of
each expert (its first records, at most ``SAMPLE_TOKENS`` tokens) carried
through both models, which costs a few hundred tokens of forward per layer
instead of a second model's whole forward.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from mergekit_com.method import distributed
from mergekit_com.method.statistics import TokenRows
from mergekit_com.model.activations import ActivationStore, CachedList
from mergekit_com.model.stepping import LayerCall

Batch = Tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)
# Tokens of the probe that finds each layer's groups of linears: the grouping follows
# the layer's code, not the values, so a few tokens of one sequence do.
PROBE_TOKENS = 16
SAMPLE_TOKENS = 256  # per expert, for the covariate shift when it is not measured on everything


def sample_of(batch: Batch, tokens: int = SAMPLE_TOKENS) -> Batch:
    """The first rows of ``batch`` (right-padded) holding at most ``tokens`` real tokens: as
    many whole rows as fit, or else the first row's first ``tokens`` tokens."""
    ids, mask = batch
    counts = mask.sum(dim=1).tolist()
    rows, total = 1, counts[0]
    while rows < len(counts) and total + counts[rows] <= tokens:
        total += counts[rows]
        rows += 1
    width = min(int(mask[:rows].sum(dim=1).max()), tokens)
    return ids[:rows, :width], mask[:rows, :width]


class Streams:
    def __init__(self, store: ActivationStore, experts: Sequence[Hashable],
                 batches: Dict[Hashable, List[Batch]], merged_all: bool, own_all: bool,
                 exact_shift: bool):
        self.experts = list(experts)
        self.store = store
        self.batches = batches
        self.masks = {e: [mask.to(store.device).bool() for _, mask in batches[e]] for e in experts}
        # under torchrun this rank's b-th batch is the expert's (rank + world_size * b)-th
        self.tokens = {e: [TokenRows.of(mask, distributed.rank() + distributed.world_size() * b)
                           for b, mask in enumerate(self.masks[e])] for e in experts}
        self.calls: Dict[Hashable, List[List[LayerCall]]] = {e: [] for e in experts}
        self.merged = {e: CachedList(store, "merged", i) for i, e in enumerate(experts)}
        self.own = {e: CachedList(store, "own", i) for i, e in enumerate(experts)}
        if exact_shift:
            merged_all = own_all = True
        self.merged_count = {e: len(batches[e]) if merged_all else 0 for e in experts}
        self.own_count = {e: len(batches[e]) if own_all else 0 for e in experts}
        # the shift's sample, through both models, when the streams do not both run everywhere
        self.sample: Optional[Dict[Hashable, Batch]] = None
        if not (merged_all and own_all):
            self.sample = {e: sample_of(batches[e][0]) for e in experts}
            self.sample_tokens = {e: TokenRows.of(self.sample[e][1].to(store.device))
                                  for e in experts}
            self.sample_merged = {e: CachedList(store, "sample_merged", i) for i, e in enumerate(experts)}
            self.sample_own = {e: CachedList(store, "sample_own", i) for i, e in enumerate(experts)}
            self.sample_calls: Dict[Hashable, List[LayerCall]] = {}

    def stream(self, name: str) -> Dict[Hashable, CachedList]:
        return self.merged if name == "merged" else self.own

    def loader(self, name: str, expert: Hashable, batch: int) -> Callable[[], torch.Tensor]:
        """Fetches one batch's hidden states from stream ``name`` when called."""
        stream = self.stream(name)[expert]
        return lambda: stream[batch]

    def count(self, name: str, expert: Hashable) -> int:
        """How many batches of ``expert`` the stream ``name`` holds (all or none)."""
        return (self.merged_count if name == "merged" else self.own_count)[expert]

    def shift_pairs(self, expert: Hashable):
        """(merged, own) hidden states, real tokens' rows only, on which the covariate
        shift is measured (gathered by index: a boolean mask cost 4x more)."""
        if self.sample is None:
            for b, tokens in enumerate(self.tokens[expert]):
                yield tokens.take(self.merged[expert][b], False), tokens.take(self.own[expert][b], False)
        else:
            tokens = self.sample_tokens[expert]
            yield (tokens.take(self.sample_merged[expert][0], False),
                   tokens.take(self.sample_own[expert][0], False))

    def embed(self, shell, own_params: Dict[Hashable, Dict[str, torch.Tensor]]) -> None:
        """Hidden states entering layer 0, every layer's call arguments, and the probe."""
        ids, _mask = self.batches[self.experts[0]][0]
        short = ids[:1, :PROBE_TOKENS]
        self.probe = shell.embed(short, torch.ones_like(short))
        for e in self.experts:
            for b, (ids, mask) in enumerate(self.batches[e]):
                calls = None
                if b < self.merged_count[e]:
                    h, calls = shell.embed(ids, mask)
                    self.merged[e].append(h)
                if b < self.own_count[e]:
                    h, own_calls = shell.embed(ids, mask, overrides=own_params[e])
                    self.own[e].append(h)
                    calls = calls or own_calls
                self.calls[e].append(calls)
            if self.sample is not None:
                ids, mask = self.sample[e]
                h, self.sample_calls[e] = shell.embed(ids, mask)
                self.sample_merged[e].append(h)
                self.sample_own[e].append(shell.embed(ids, mask, overrides=own_params[e])[0])

    def call(self, expert: Hashable, batch: int, layer: int) -> LayerCall:
        return self.calls[expert][batch][layer]
