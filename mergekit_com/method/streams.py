"""The hidden states entering the current layer, per expert and calibration batch.

Two streams per expert t:
  * ``merged``: in the merged model so far: the chain's inputs (``chain:
    module`` / ``block``) and the activations the output model will have;
  * ``own``: in expert t's unmerged model: RegMean's inputs (``chain:
    none``) and the targets of ``objective: match_expert``.
A stream the chain and objective do not need is kept only for the merge
report's covariate shift, on the first batch of each expert (every batch with
``exact_shift``), so it costs one batch of forwards, not a second model's.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Sequence, Tuple

import torch

from mergekit_com.model.activations import ActivationStore, CachedList
from mergekit_com.model.stepping import LayerCall

Batch = Tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


class Streams:
    def __init__(self, store: ActivationStore, experts: Sequence[Hashable],
                 batches: Dict[Hashable, List[Batch]], merged_all: bool, own_all: bool,
                 report_batches: int):
        self.experts = list(experts)
        self.batches = batches
        self.masks = {e: [mask.to(store.device).bool() for _, mask in batches[e]] for e in experts}
        self.calls: Dict[Hashable, List[List[LayerCall]]] = {e: [] for e in experts}
        self.merged = {e: CachedList(store, "merged", i) for i, e in enumerate(experts)}
        self.own = {e: CachedList(store, "own", i) for i, e in enumerate(experts)}

        def kept(everything: bool) -> Dict[Hashable, int]:
            return {e: len(batches[e]) if everything else min(report_batches, len(batches[e]))
                    for e in experts}

        self.merged_count, self.own_count = kept(merged_all), kept(own_all)

    def stream(self, name: str) -> Dict[Hashable, CachedList]:
        return self.merged if name == "merged" else self.own

    def count(self, name: str, expert: Hashable) -> int:
        """How many leading batches of ``expert`` the stream ``name`` holds."""
        return (self.merged_count if name == "merged" else self.own_count)[expert]

    def shared_batches(self, expert: Hashable) -> range:
        """Batches both streams hold: where the covariate shift is measured."""
        return range(min(self.merged_count[expert], self.own_count[expert]))

    def embed(self, shell, own_params: Dict[Hashable, Dict[str, torch.Tensor]]) -> None:
        """Hidden states entering layer 0, and every layer's call arguments."""
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

    def call(self, expert: Hashable, batch: int, layer: int) -> LayerCall:
        return self.calls[expert][batch][layer]
