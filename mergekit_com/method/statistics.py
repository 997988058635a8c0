"""Calibration statistics of one input shared by a group of linears (q/k/v, gate/up, ...).

Per expert: the running sums of ``X^T X`` (and ``X^T Z`` for ``match_expert`` and
``blend``, or each linear's ``X^T Y`` where that is no larger) over that expert's
non-padding tokens, summed over ranks under
torchrun, then turned into the mean statistics the solve uses. ``alpha: auto``
also needs the spread of the per-sequence Grams, ``blend: auto`` the same sums
over two folds of whole sequences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Sequence, Set

import torch

from mergekit_com.method import distributed, linalg

LOG = logging.getLogger("mergekit.chain_of_merges.statistics")  # under mergekit's logger

# measured by `bench budget` on the tiny and chat zoos (docs/benchmark.md#calibration-budget)
FEW_TOKENS_COST = ("on our zoos, under 1 token per input feature cost the default merge 6-35 "
                   "points of normalized accuracy; from 4 tokens per feature it was within 3 "
                   "points of its best")


@dataclass(frozen=True)
class TokenRows:
    """Where a padded batch's real tokens are: their positions among the flattened
    ``[batch * positions]`` rows, and the sequences they form. Found once per batch and
    taken from every layer's inputs (an index gather measured 3-8x faster than a
    boolean mask on the zoos' and SmolLM2's shapes).

    ``held_out`` is the same batch for ``blend: auto``, with its rows gathered fold by
    fold: sequence ``i`` is in fold ``(i + first) % 2``, ``first`` being the batch's index
    among all of the expert's batches (under torchrun, ranks hold every world_size-th
    batch), so the folds depend neither on the number of ranks nor on how many
    sequences a batch packs, and each fold's rows are a slice of the one gather."""

    index: torch.Tensor
    sequences: linalg.Sequences
    held_out: Optional["TokenRows"] = None

    @classmethod
    def of(cls, valid: torch.Tensor, first: int = 0) -> "TokenRows":
        """``valid``: the batch's ``[batch, positions]`` attention mask."""
        valid = valid.bool()
        lengths = valid.sum(1).tolist()
        folds = [[i for i in range(len(lengths)) if (i + first) % 2 == f] for f in (0, 1)]
        order = folds[0] + folds[1]
        positions = torch.arange(valid.numel(), device=valid.device).view(valid.shape)
        held_out = cls(positions[order][valid[order]], linalg.Sequences(tuple(lengths[i] for i in order),
                                              fold_rows=sum(lengths[i] for i in folds[0])))
        return cls(valid.flatten().nonzero().squeeze(1), linalg.Sequences(tuple(lengths)), held_out)

    def take(self, x: torch.Tensor, biased: bool) -> torch.Tensor:
        """The tokens' rows of ``x`` (``[batch, positions, width]``) as float32 (float64
        stays float64), with a ones column for a bias."""
        x = x.reshape(-1, x.shape[-1]).index_select(0, self.index)
        x = x if x.dtype == torch.float64 else x.to(torch.float32)
        return linalg.with_ones_column(x) if biased else x


class GroupStatistics:
    """Moments of one shared input, per expert."""

    def __init__(self, experts: Sequence[Hashable], biased: bool, cross: bool,
                 spread: bool = False, held_out: bool = False, by_outputs: bool = False):
        self.experts = list(experts)
        self.biased = biased  # the group has a bias: solved as a column on a constant input
        self.cross = cross  # also accumulate X^T Z (objective: match_expert, blend)
        # ... as each linear's X^T Y (Y = Z W^T, its output in the expert's own layer): for a
        # group with no more outputs than inputs it costs in x out per token, not in x in
        self.by_outputs = cross and by_outputs
        self.spread = spread  # alpha: auto
        self.held_out = held_out  # blend: auto

        def moments() -> linalg.Moments:
            if held_out:
                return linalg.Moments.held_out_pair(track_spread=spread)
            return linalg.Moments(track_spread=spread)

        self.moments: Dict[Hashable, linalg.Moments] = {e: moments() for e in experts}
        self.dtype = torch.float32  # the activations' rows (float64 when the walk is)

    def rows(self, tokens: TokenRows) -> TokenRows:
        """Where a batch's tokens are, in the order these statistics take them."""
        return tokens.held_out if self.held_out else tokens

    def output_rows(self, tokens: TokenRows) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``add`` takes of a linear's output (its tokens' rows, ordered as ``rows``):
        given to the pass that makes the output, so it is gathered as it is made."""
        rows = self.rows(tokens)
        return lambda y: rows.take(y, False)

    def add(self, expert: Hashable, x: torch.Tensor, tokens: TokenRows,
            z: Optional[torch.Tensor] = None,
            outputs: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """One batch: ``x`` the group's inputs, ``z`` the expert's own (for the cross term),
        ``outputs`` its linears' outputs on ``z`` by weight name (``by_outputs``), as
        ``output_rows`` takes them, ``tokens`` where the batch's real tokens are."""
        if self.by_outputs and outputs is None:
            raise ValueError("these statistics keep X^T Y: they need the linears' outputs")
        tokens = self.rows(tokens)
        rows = tokens.take(x, self.biased)
        self.dtype = rows.dtype
        targets = tokens.take(z, self.biased) if self.cross else None
        ys = outputs if self.by_outputs else None
        sequences = tokens.sequences if self.spread or self.held_out else None
        self.moments[expert].add(rows, targets, sequences, ys)

    def finish(self, where: str, warned: Set[Hashable]) -> linalg.SharedInputStats:
        """Sum over ranks, warn once per expert about too few tokens, return the means."""
        distributed.all_reduce_moments(self.moments.values())
        for mo in self.moments.values():
            mo.sum_folds()
        for expert, mo in self.moments.items():
            if mo.gram is None or expert in warned:
                continue
            width = mo.gram.shape[0]
            if mo.count < width:
                warned.add(expert)  # once per expert: later layers are alike
                LOG.warning(
                    "model %s: %d calibration tokens for %d input features (%s): the Gram is "
                    "rank-deficient, so shrinkage and the ridge decide what the data cannot; "
                    "expect a weaker merge (%s); give more calibration data",
                    expert, mo.count, width, where, FEW_TOKENS_COST,
                )
        stats = self._means(self.moments)
        if self.spread:
            stats.auto_alpha = {e: linalg.shrinkage_alpha(stats.grams[e], mo.count, mo.sequences, mo.spread)
                                for e, mo in self.moments.items()}
        if self.held_out and all(f.count for mo in self.moments.values() for f in mo.folds):
            stats.folds = [self._means({e: mo.folds[i] for e, mo in self.moments.items()})
                           for i in range(2)]
        return stats

    def _means(self, moments: Dict[Hashable, linalg.Moments]) -> linalg.SharedInputStats:
        stats = linalg.SharedInputStats(
            grams={e: mo.mean_gram() for e, mo in moments.items()},
            crosses={e: mo.mean_cross() for e, mo in moments.items()}
            if self.cross and not self.by_outputs else {},
            counts={e: mo.count for e, mo in moments.items()},
            dtype=self.dtype,
        )
        if self.by_outputs:
            for e, mo in moments.items():
                stats.outputs[e], stats.cross_diags[e] = mo.mean_outputs()
        return stats
