"""What the walk needs from outside, as small protocols.

``integration/`` implements them on top of mergekit (its loaders, its
per-tensor tasks, its writer); tests and the benchmark can implement them
on plain dicts. The walk never sees a file or a mergekit object.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Protocol, Sequence, Tuple

import torch

from mergekit_com.method.parameters import SolveSettings

# name -> expert -> that expert's tensor
Gathered = Dict[str, Dict[Hashable, torch.Tensor]]
# the tensors written for one step (embeddings, a layer), in write order
Written = List[Tuple[str, torch.Tensor]]


class TensorIO(Protocol):
    """Reading the experts' tensors and writing the merged model's."""

    def read(self, names: Sequence[str]) -> Gathered:
        """Every expert's tensor for each of ``names`` (the base's too, if it has one)."""

    def write_fallback(self, name: str, tensors: Dict[Hashable, torch.Tensor]) -> torch.Tensor:
        """Merge ``name`` by the fallback rule, write it, return it as written."""

    def write_solved(self, name: str, value: torch.Tensor,
                     tensors: Dict[Hashable, torch.Tensor]) -> torch.Tensor:
        """Write a solved linear weight or bias, return it as written (output dtype)."""

    def rewrite(self, name: str, written: torch.Tensor) -> None:
        """Write again a tensor a checkpoint holds (resume)."""

    def solve_settings(self, name: str) -> SolveSettings:
        """``alpha``, ``ridge``, ``blend`` and the expert weights resolved for this tensor."""

    def end_layer(self) -> None:
        """The layer is written: release what reading it holds (mapped files)."""


class Checkpoints(Protocol):
    """Completed steps of an interrupted merge: ``"pre"``, then layers 0, 1, ..."""

    def completed_layers(self) -> int:
        """How many decoder layers are saved (0 when even "pre" is missing)."""

    def save(self, key, written: Written, report: Optional[dict]) -> None:
        ...

    def load(self, key) -> Tuple[Written, Optional[dict]]:
        ...


class Report(Protocol):
    """How well each layer's merge fits each expert (``io/report.py``)."""

    def add_shift(self, layer: str, expert: int, merged: torch.Tensor, own: torch.Tensor) -> None:
        """Hidden states (valid tokens) entering ``layer`` in the merged model and expert's own."""

    def sum_shift_over_ranks(self, layer: str, device: torch.device) -> None:
        ...

    def add_residual(self, layer: str, linear: str, expert: int, gram: torch.Tensor,
                     target: torch.Tensor, merged: torch.Tensor,
                     target_norm: Optional[float] = None) -> None:
        """How far the merged ``[out, in]`` weight is from expert ``expert``'s ``target`` on
        its inputs (``gram``); ``target_norm``: ``tr(W G W^T)`` where the solve formed it."""

    def add_alpha(self, layer: str, linear: str, alphas: List[float]) -> None:
        """The keep ratios ``alpha: auto`` chose for one linear, one per expert."""

    def add_blend(self, layer: str, linear: str, share: float) -> None:
        """The share of the match_expert target ``blend: auto`` chose for one linear."""

    def layer_state(self, layer: str) -> dict:
        """This layer's entries, for a checkpoint."""

    def restore_layer(self, layer: str, state: dict) -> None:
        ...


class Progress(Protocol):
    """What a user watches: the layer being merged, and what it is doing."""

    def status(self, text: str) -> None:
        ...

    def layer_done(self) -> None:
        ...


class NoProgress:
    def status(self, text: str) -> None:
        pass

    def layer_done(self) -> None:
        pass
