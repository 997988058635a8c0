"""Wall-clock seconds per phase of a chain run (load, forward, gram, solve, write).

The engine wraps each phase in ``PHASES.phase(name)``; the benchmark reads the
totals after a merge. On CUDA the clock waits for queued kernels, so a phase
is charged for its own GPU work rather than whatever launches next.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator

import torch

ORDER = ("load", "forward", "gram", "solve", "write")


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.cuda = False

    def reset(self, device: torch.device) -> None:
        self.seconds = {name: 0.0 for name in ORDER}
        self.cuda = device.type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


PHASES = PhaseTimer()  # one chain runs at a time per process
