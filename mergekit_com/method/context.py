"""What every step of one walk shares: the model, the ports, the streams, the strategies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Set

import torch

from mergekit_com.method import distributed
from mergekit_com.method.parameters import AUTO, Objective
from mergekit_com.method.ports import Progress, Report, TensorIO
from mergekit_com.method.statistics import GroupStatistics
from mergekit_com.method.strategies import ChainStrategy
from mergekit_com.method.streams import Streams
from mergekit_com.method.timing import PHASES
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
    dtype: torch.dtype  # the walk's compute dtype: float32, or float64 for `dtype: float64`
    # bytes the paused layer passes may hold (None: what the activation budget has left);
    # past it they restart instead (see model/passes.py)
    pass_budget: Optional[int] = None
    warned: Set[Hashable] = field(default_factory=set)  # experts warned about too few tokens

    @property
    def experts(self) -> List[Hashable]:
        return self.streams.experts

    def own_params(self, gathered: Dict[str, Dict[Hashable, torch.Tensor]], expert: Hashable,
                   prefix: str = "") -> Dict[str, torch.Tensor]:
        """Expert ``expert``'s floating-point tensors among ``gathered``, local names, compute dtype."""
        return {
            n[len(prefix):]: t[expert].to(device=self.device, dtype=self.dtype)
            for n, t in gathered.items()
            if expert in t and t[expert].is_floating_point()
        }

    def group_statistics(self, names, biased: bool, by_outputs: bool = False):
        """Empty statistics for a group of linears (weight names): what their solve
        settings need (``alpha: auto``: per-sequence spread; ``blend: auto``: folds);
        ``by_outputs``: the targets' moments from the linears' outputs (the walk gives them)."""
        settings = [self.io.solve_settings(n) for n in names]
        spread = self.objective.uses_alpha and any(s.alpha == AUTO for s in settings)
        held_out = self.objective.name == Objective.BLEND and any(s.blend == AUTO for s in settings)
        return GroupStatistics(self.experts, biased, self.objective.needs_expert_inputs,
                               spread=spread, held_out=held_out, by_outputs=by_outputs)

    def installed(self, written: torch.Tensor) -> torch.Tensor:
        """What the running model uses: a tensor as written, in the compute dtype on the device."""
        return written.to(device=self.device, dtype=self.dtype)

    def record_shift(self, layer: str) -> None:
        """Covariate shift of the hidden states entering ``layer``, per expert."""
        with PHASES.phase("report"):
            for t, e in enumerate(self.experts):
                for merged, own in self.streams.shift_pairs(e):
                    self.report.add_shift(layer, t, merged, own)
            if distributed.active():
                self.report.sum_shift_over_ranks(layer, self.device)
