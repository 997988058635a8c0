"""``chain_of_merges`` declared to mergekit: its name, parameters and input contract.

mergekit plans one task per output tensor and would call ``merge_group`` for
each. CoM cannot merge a tensor on its own: every linear depends on the
merged layers before it and on calibration data. So the planner hands the
whole plan to the chain task (``chain_task.py``), which executes mergekit's
loading and writing around the walk, and ``merge_group`` refuses the
per-tensor entry points.
"""

from __future__ import annotations

from typing import Any

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_com.method.parameters import METHOD_NAME, PAPER_URL, PARAMETERS


class ChainOfMergesMethod(GroupMergeMethod):
    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="Chain of Merges",
        reference_url=PAPER_URL,
        parameters=tuple(
            ParameterSpec(p.name, p.type, ParameterScope.INPUT if p.per_model else ParameterScope.SHARED,
                          default=p.default, description=p.description)
            for p in PARAMETERS.values()
        ),
        contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
        uses_accelerator=True,
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        raise RuntimeError(
            f"{METHOD_NAME} needs its calibration walk: run it through mergekit-yaml, "
            "mergekit-com or mergekit.merge.run_merge, not per-tensor APIs"
        )


chain_of_merges = ChainOfMergesMethod()


def register() -> None:
    """Make the method known to mergekit's registry (idempotent)."""
    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(chain_of_merges)


register()  # on import: the start-up hook may fire while this module is importing
