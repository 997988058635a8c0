"""Config checks that stop a chain_of_merges run before any work, naming what to fix."""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, List, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import SaveTensor
from mergekit.options import MergeOptions
from pydantic import TypeAdapter, ValidationError

from mergekit_com.errors import ChainConfigError
from mergekit_com.integration.config_views import parameter_scopes, scalars
from mergekit_com.method.parameters import (
    METHOD_NAME,
    PARAMETERS,
    WALK_WIDE,
    check_value,
)


def _has_type(ty, value) -> bool:
    if isinstance(value, bool) and ty in (int, float):
        return False  # YAML `true` is no number, though pydantic would take it as 1
    try:
        TypeAdapter(ty).validate_python(value)
    except ValidationError:
        return False
    return True


def check_parameter_names(config) -> None:
    """Unknown names and values of the wrong type, before mergekit plans anything."""
    valid = sorted(PARAMETERS)
    for where, params, per_model in parameter_scopes(config):
        for name, setting in (params or {}).items():
            if name not in PARAMETERS:
                close = difflib.get_close_matches(str(name), valid, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ChainConfigError(
                    f"{where}: unknown parameter '{name}' for {METHOD_NAME}; "
                    f"{hint}valid parameters: {', '.join(valid)}"
                )
            parameter = PARAMETERS[name]
            if per_model and not parameter.per_model:
                raise ChainConfigError(
                    f"{where}: parameter '{name}' applies to the whole merge, not to one "
                    "model; set it under the top-level `parameters:`"
                )
            for value in scalars(setting):
                if not _has_type(parameter.type, value):
                    raise ChainConfigError(
                        f"{where}: parameter '{name}' = {value!r} is not a valid "
                        f"{getattr(parameter.type, '__name__', 'string')}"
                    )


def check_options(options: MergeOptions) -> None:
    """Flags CoM cannot honour, and a device that is not there, before any loading."""
    if options.multi_gpu:
        raise ChainConfigError(
            f"--multi-gpu (or --gpu-rich) is not supported by {METHOD_NAME}: its walk is "
            "sequential (each layer needs the merged layers before it); run it on one "
            "device with --cuda or --device cuda:N"
        )
    try:
        device = torch.device(options.device or "cpu")
    except (RuntimeError, ValueError):
        raise ChainConfigError(f"--device {options.device!r} is not a torch device") from None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps
    if device.type not in ("cpu", "meta") and hasattr(backend, "is_available"):
        count = backend.device_count() if backend.is_available() else 0
        if (device.index or 0) >= count:
            raise ChainConfigError(
                f"--device {options.device} (or --cuda): torch sees {count or 'no'} "
                f"{device.type} device(s); use --device cpu or --device auto"
            )


def check_same_experts(save_tasks: List[SaveTensor], experts: List[ModelReference], listed,
                       base) -> None:
    """With ``slices:``, every slice must merge the same experts: each expert's
    calibration data runs through the whole output model."""
    want = set(experts)
    for save in save_tasks:
        got = {m for m in save.tensor_task.model_order if m != base or m in listed}
        if got != want:
            raise ChainConfigError(
                f"{METHOD_NAME}: {save.tensor_name} merges {', '.join(sorted(map(str, got)))} "
                f"but the merge has experts {', '.join(sorted(map(str, want)))}; every slice "
                "must list the same models, since each expert's calibration data runs "
                "through the whole output model"
            )


def check_planned_values(save_tasks: List[SaveTensor], experts: List[ModelReference], base) -> None:
    """Range-check every resolved value (filters and gradients included)."""
    first: Dict[str, Any] = {}
    calibrations: Dict[ModelReference, Tuple[Any, str]] = {}
    for save in save_tasks:
        task = save.tensor_task
        for name, value in task.parameters.items():
            check_value(name, value, f"(at {save.tensor_name})")
            if name in WALK_WIDE:
                if first.setdefault(name, value) != value:
                    raise ChainConfigError(
                        f"parameter '{name}' must have one value for the whole merge; "
                        f"got {first[name]!r} and {value!r} (at {save.tensor_name})"
                    )
            if name == "fallback" and value == "task_arithmetic" and base is None:
                raise ChainConfigError(
                    "fallback: task_arithmetic needs a base_model; set base_model or use "
                    "fallback: average"
                )
        for model, params in task.input_parameters.items():
            for name, value in params.items():
                if value is not None:
                    check_value(name, value, f"of model {model}")
            if model in experts:
                seen, where = calibrations.setdefault(model, (params.get("calibration"),
                                                              save.tensor_name))
                if seen != params.get("calibration"):
                    raise ChainConfigError(
                        f"model {model} has calibration {seen!r} for {where} but "
                        f"{params.get('calibration')!r} for {save.tensor_name}; give one "
                        "calibration per model (the same in every slice)"
                    )
    if not save_tasks:
        return
    for model in experts:
        calibration = calibrations.get(model, (None, ""))[0]
        if not calibration:
            raise ChainConfigError(
                f"model {model} has no `calibration` parameter; give every expert a "
                "calibration file (parameters: {calibration: path/to/data.jsonl})"
            )
        if not os.path.exists(os.path.abspath(os.path.expanduser(calibration))):
            raise ChainConfigError(
                f"calibration file {calibration} (for model {model}) does not exist; fix the "
                "path (relative paths are resolved from the working directory)"
            )
