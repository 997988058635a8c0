"""What every step of one walk shares: the model, the ports, the streams, the strategies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Set

import torch

from mergekit_com.method import distributed
from mergekit_com.method.parameters import AUTO, Objective
from mergekit_com.method.ports import Progress, Report, TensorIO
from mergekit_com.method.statistics import GroupStatistics
from mergekit_com.method.strategies import ChainStrategy
from mergekit_com.method.streams import Streams
from mergekit_com.model.stepping import ModelShell


@dataclass
class WalkContext:
    shell: ModelShell
    io: TensorIO
    report: Report
    progress: Progress
    streams: Streams
    chain: ChainStrategy
    objective: object  # RegMeanObjective, MatchExpertObjective or BlendObjective
    device: torch.device
    # bytes the paused layer passes may hold; past it they restart instead (see model/passes.py)
    pass_budget: int
    warned: Set[Hashable] = field(default_factory=set)  # experts warned about too few tokens
    batch_size: int = 8  # sequences per calibration batch (numbers the sequences for blend: auto)

    @property
    def experts(self) -> List[Hashable]:
        return self.streams.experts

    def own_params(self, gathered: Dict[str, Dict[Hashable, torch.Tensor]], expert: Hashable,
                   prefix: str = "") -> Dict[str, torch.Tensor]:
        """Expert ``expert``'s floating-point tensors among ``gathered``, local names, float32."""
        return {
            n[len(prefix):]: t[expert].to(device=self.device, dtype=torch.float32)
            for n, t in gathered.items()
            if expert in t and t[expert].is_floating_point()
        }

    def first_sequence(self, batch: int) -> int:
        """Index of this rank's ``batch``-th batch's first sequence in the expert's whole
        calibration set (under torchrun, ranks hold every world_size-th batch), so that
        held-out folds do not depend on the number of ranks."""
        return (distributed.rank() + distributed.world_size() * batch) * self.batch_size

    def group_statistics(self, names, biased: bool):
        """Empty statistics for a group of linears (weight names): what their solve
        settings need (``alpha: auto``: per-sequence spread; ``blend: auto``: folds)."""
        settings = [self.io.solve_settings(n) for n in names]
        spread = any(s.alpha == AUTO for s in settings)
        held_out = self.objective.name == Objective.BLEND and any(s.blend == AUTO for s in settings)
        return GroupStatistics(self.experts, biased, self.objective.needs_expert_inputs,
                               spread=spread, held_out=held_out)

    def installed(self, written: torch.Tensor) -> torch.Tensor:
        """What the running model uses: a tensor as written, in float32 on the device."""
        return written.to(device=self.device, dtype=torch.float32)

    def record_shift(self, layer: str) -> None:
        """Covariate shift of the hidden states entering ``layer``, per expert."""
        streams = self.streams
        for t, e in enumerate(self.experts):
            for b in streams.shared_batches(e):
                valid = streams.masks[e][b]
                self.report.add_shift(layer, t, streams.merged[e][b][valid], streams.own[e][b][valid])
        if distributed.active():
            self.report.sum_shift_over_ranks(layer, self.device)
