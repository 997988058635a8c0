"""The Chain of Merges walk: every layer merged given the merged layers before it.

  1. Embeddings: merge the tensors before the first layer by the fallback
     rule (or take them from a checkpoint), install them, and embed every
     expert's calibration batches: the streams entering layer 0.
  2. For each decoder layer, in forward order: take it from its checkpoint
     or merge it (``layer.py``: fallback tensors, then each group of
     linears, solved on the chain's inputs); push the streams through it;
     checkpoint it.
  3. Head: final norm(s) by the fallback rule, an untied ``lm_head`` solved
     like a linear (``head.py``).
The prefix is never re-run, except on resume, where the checkpointed layers
are run again on the calibration data to rebuild the streams (the same
computation, so the result is bit-identical on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from mergekit_com.method import distributed
from mergekit_com.method.context import WalkContext
from mergekit_com.method.head import merge_head
from mergekit_com.method.layer import LayerMerge
from mergekit_com.method.parameters import WalkSettings
from mergekit_com.method.ports import (
    Checkpoints,
    NoProgress,
    Progress,
    Report,
    TensorIO,
    Written,
)
from mergekit_com.method.strategies import CHAINS, OBJECTIVES
from mergekit_com.method.streams import Batch, Streams
from mergekit_com.method.timing import ORDER, PHASES
from mergekit_com.model.activations import (
    ActivationStore,
    resolve_budget,
    resolve_dtype,
)
from mergekit_com.model.stepping import ModelShell

# A child of mergekit's logger: -v/-vv and any mergekit logging setup apply.
LOG = logging.getLogger("mergekit.chain_of_merges.walk")


@dataclass(frozen=True)
class Layout:
    """Output tensor names in forward order: before, per decoder layer, after the layers."""

    pre: Tuple[str, ...]
    layers: Tuple[Tuple[str, ...], ...]
    post: Tuple[str, ...]


class ChainWalk:
    """One run of the walk over a model shell, through the ports."""

    def __init__(self, shell: ModelShell, layout: Layout, io: TensorIO, report: Report,
                 settings: WalkSettings, batches: Dict[Hashable, List[Batch]], *,
                 tied: bool, device: torch.device, checkpoints: Optional[Checkpoints] = None,
                 progress: Optional[Progress] = None, exact_shift: bool = True,
                 pass_budget: Optional[int] = None):
        self.shell, self.layout, self.io, self.report = shell, layout, io, report
        self.settings, self.batches, self.tied = settings, batches, tied
        self.device, self.checkpoints = device, checkpoints
        self.progress = progress or NoProgress()
        self.exact_shift = exact_shift
        # bytes paused layer passes may hold (None: the activation budget); 0 restarts them
        self.pass_budget = pass_budget

    def run(self) -> None:
        PHASES.reset(self.device)
        s = self.settings
        store = ActivationStore(self.device, resolve_dtype(s.activation_dtype, self.device),
                                resolve_budget(s.activation_budget, self.device))
        try:
            with torch.no_grad():
                self._walk(store)
        finally:
            store.close()
        LOG.info("chain phases (s): %s", ", ".join(f"{k} {PHASES.seconds[k]:.2f}" for k in ORDER))

    def _context(self, store: ActivationStore) -> WalkContext:
        chain, objective = CHAINS[self.settings.chain], OBJECTIVES[self.settings.objective]
        experts = list(self.batches)
        streams = Streams(
            store, experts, self.batches,
            merged_all=chain.stream == "merged" or self.exact_shift,
            own_all=(chain.stream == "own" or objective.needs_expert_inputs or self.exact_shift),
            report_batches=1,
        )
        budget = store.budget if self.pass_budget is None else self.pass_budget
        return WalkContext(self.shell, self.io, self.report, self.progress, streams, chain,
                           objective, self.device, pass_budget=budget,
                           batch_size=self.settings.batch_size)

    def _walk(self, store: ActivationStore) -> None:
        ctx = self._context(store)
        done = self.checkpoints.completed_layers() if self.checkpoints else 0
        # every rank must replay the same prefix (rank 0 writes the checkpoints)
        done = distributed.min_over_ranks(done, self.device)
        if done:
            LOG.info("resuming: layers 0-%d are taken from the checkpoints", done - 1)

        own_pre = self._embed(ctx, replay=bool(done))  # 1
        for index, names in enumerate(self.layout.layers):  # 2
            self.before_layer(ctx, index)
            step = LayerMerge(ctx, index, names)
            if index < done:
                written, state = self.checkpoints.load(index)
                self._rewrite(written)
                self.report.restore_layer(step.key, state)
                step.replay(written)
            else:
                written = step.merge()
                self._checkpoint(index, written, self.report.layer_state(step.key))
            self.after_layer(ctx, index, written)
            self.progress.layer_done()
        self.shell.release()
        merge_head(ctx, self.layout.post, self.tied, own_pre)  # 3

    # Extension points (the benchmark's naive reference chain uses them).
    def before_layer(self, ctx: WalkContext, index: int) -> None:
        """Called with ``ctx.streams`` holding the hidden states entering layer ``index``."""

    def after_layer(self, ctx: WalkContext, index: int, written: Written) -> None:
        """Called once layer ``index`` is merged (or replayed) and the streams are past it."""

    def _embed(self, ctx: WalkContext, replay: bool) -> Dict[Hashable, Dict[str, torch.Tensor]]:
        """Step 1; returns each expert's own embedding tensors (its own stream starts there)."""
        ctx.progress.status("embeddings")
        gathered = self.io.read(self.layout.pre)  # the experts' own: needed on resume too
        if replay:
            written, _ = self.checkpoints.load("pre")
            self._rewrite(written)
        else:
            written = [(n, self.io.write_fallback(n, gathered[n])) for n in self.layout.pre]
            self._checkpoint("pre", written, None)
        for name, value in written:
            self.shell.set_tensor(name, value)
        if self.tied:
            self.shell.tie_embeddings()
        own_pre = {e: ctx.own_params(gathered, e) for e in ctx.experts}
        ctx.streams.embed(self.shell, own_pre)
        return own_pre

    def _rewrite(self, written: Written) -> None:
        for name, tensor in written:
            self.io.rewrite(name, tensor)

    def _checkpoint(self, key, written: Written, report: Optional[dict]) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(key, written, report)
