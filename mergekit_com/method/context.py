"""What every step of one walk shares: the model, the ports, the streams, the strategies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Set

import torch

from mergekit_com.method import distributed
from mergekit_com.method.ports import Progress, Report, TensorIO
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
    objective: object  # RegMeanObjective or MatchExpertObjective
    device: torch.device
    # bytes the paused layer passes may hold; past it they restart instead (see model/passes.py)
    pass_budget: int
    warned: Set[Hashable] = field(default_factory=set)  # experts warned about too few tokens

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
