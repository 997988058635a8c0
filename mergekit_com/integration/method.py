"""``chain_of_merges`` declared to mergekit: its name, parameters and input contract.

mergekit plans one task per output tensor and would call ``merge_group`` for
each. CoM cannot merge a tensor on its own: every linear depends on the
merged layers before it and on calibration data. So the planner hands the
whole plan to the chain task (``chain_task.py``), which executes mergekit's
loading and writing around the walk.

The per-tensor entry points (``merge_state_dicts``, ``merge_group``,
``mergekit-pytorch``) have neither a model to run nor calibration data, and
a tensor-by-tensor fallback would be a different method under CoM's name, so
they raise ``PerTensorMergeError``. The method declares this as
``needs_model_walk``, for suites that run every registered method per tensor
(docs/mergekit-compat.md, ``make test-mergekit``).
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

from mergekit_com.errors import MergeInputError
from mergekit_com.method.parameters import METHOD_NAME, PAPER_URL, PARAMETERS


class PerTensorMergeError(MergeInputError):
    """chain_of_merges called on tensors alone, without a model walk (one line in
    mergekit's commands, such as mergekit-pytorch; a ValueError for Python callers)."""


class ChainOfMergesMethod(GroupMergeMethod):
    # Merges whole models (calibration passes through the merged prefix), never one tensor.
    needs_model_walk = True
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
        raise PerTensorMergeError(
            f"{METHOD_NAME} merges whole models (each layer is solved on calibration data "
            "passed through the layers merged before it), not single tensors: run it "
            "through mergekit-yaml, mergekit-com or mergekit.merge.run_merge, not "
            "merge_state_dicts or mergekit-pytorch"
        )


chain_of_merges = ChainOfMergesMethod()


def register() -> None:
    """Make the method known to mergekit's registry (idempotent)."""
    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(chain_of_merges)


register()  # on import: the start-up hook may fire while this module is importing
