"""Fitting CoM into mergekit's planner and executor.

mergekit plans one independent task per output tensor. For
``merge_method: chain_of_merges`` the planner still plans them all (so
loading, LoRA, vocabulary permutation, parameter filters and writing stay
mergekit's), and then hands the whole plan to one ``ChainOfMergesTask``,
which executes those per-tensor tasks itself, layer by layer in forward
order, with the calibration walk in between.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from pydantic import BaseModel

from mergekit.common import ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.base import ParameterScope
from mergekit.io.tasks import FinalizeModel, SaveTensor, TensorWriterTask
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit.tokenizer import BuildTokenizer

from mergekit_com import card, distributed, support
from mergekit_com.errors import ChainConfigError
from mergekit_com.method import (
    ACTIVATION_DTYPES,
    CHAINS,
    FALLBACKS,
    GLOBAL_ONLY,
    METHOD_NAME,
    OBJECTIVES,
    PARAMETERS,
)
from mergekit_com.walker import find_layer_list

__all__ = ["ChainConfigError", "ChainOfMergesTask", "patch_planner"]


class ChainLayout(BaseModel, frozen=True):
    """Output tensor names in forward order: before, per layer, after the layers."""

    pre: Tuple[str, ...]
    layers: Tuple[Tuple[str, ...], ...]
    post: Tuple[str, ...]
    first_layer_weight: str


class ChainOfMergesTask(Task[None]):
    save_tasks: Tuple[SaveTensor, ...]
    writer_task: TensorWriterTask
    tokenizer_task: Optional[BuildTokenizer] = None
    layout: ChainLayout
    out_config: str
    config_source: ModelReference  # whose configuration class the output uses
    experts: Tuple[ModelReference, ...]
    referenced: Tuple[ModelReference, ...]  # for chat_template: auto
    chat_template: Optional[str] = None
    options: MergeOptions
    # where completed layers are checkpointed (None: not resumable)
    checkpoint_dir: Optional[str] = None

    def arguments(self) -> Dict[str, Task]:
        args: Dict[str, Task] = {"writer": self.writer_task}
        if self.tokenizer_task is not None:
            args["tokenizer"] = self.tokenizer_task
        return args

    def main_thread_only(self) -> bool:
        return True

    def execute(self, writer, tokenizer=None) -> None:
        from mergekit_com.engine import run_chain
        from mergekit_com.output import copy_generation_config, copy_remote_code

        run_chain(self, writer, tokenizer)
        if not distributed.is_writer():
            return  # other ranks only contribute calibration statistics
        writer.finalize()
        out_path = self.writer_task.out_path
        copy_generation_config([self.config_source, *self.experts], out_path, self.options)
        copy_remote_code(self.config_source, out_path, self.options)


# ---------------------------------------------------------------- validation


def _parameter_scopes(config) -> Iterable[Tuple[str, Dict[str, Any], bool]]:
    """Every ``parameters:`` mapping a user can write: (where, mapping, is per-model)."""
    yield "parameters", config.parameters, False
    for i, m in enumerate(config.models or []):
        yield f"models[{i}] ({m.model})", m.parameters, True
    for si, s in enumerate(config.slices or []):
        yield f"slices[{si}]", s.parameters, False
        for j, src in enumerate(s.sources):
            yield f"slices[{si}].sources[{j}] ({src.model})", src.parameters, True
    for name, mod in (config.modules or {}).items():
        yield f"modules.{name}", mod.parameters, False
        for i, m in enumerate(mod.models or []):
            yield f"modules.{name}.models[{i}] ({m.model})", m.parameters, True
        for si, s in enumerate(mod.slices or []):
            yield f"modules.{name}.slices[{si}]", s.parameters, False
            for j, src in enumerate(s.sources):
                yield f"modules.{name}.slices[{si}].sources[{j}] ({src.model})", src.parameters, True


def _scalars(setting: Any) -> Iterable[Any]:
    """The plain values inside a setting (a scalar, a gradient, or filters)."""
    if isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    elif hasattr(setting, "value"):  # ConditionalParameter
        yield from _scalars(setting.value)
    else:
        yield setting


def _has_type(ty, value) -> bool:
    from pydantic import TypeAdapter, ValidationError

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
    for where, params, per_model in _parameter_scopes(config):
        for name, setting in (params or {}).items():
            if name not in PARAMETERS:
                close = difflib.get_close_matches(str(name), valid, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ChainConfigError(
                    f"{where}: unknown parameter '{name}' for {METHOD_NAME}; "
                    f"{hint}valid parameters: {', '.join(valid)}"
                )
            ty, scope = PARAMETERS[name][:2]
            if per_model and scope == ParameterScope.SHARED:
                raise ChainConfigError(
                    f"{where}: parameter '{name}' applies to the whole merge, not to one "
                    "model; set it under the top-level `parameters:`"
                )
            for value in _scalars(setting):
                if not _has_type(ty, value):
                    raise ChainConfigError(
                        f"{where}: parameter '{name}' = {value!r} is not a valid "
                        f"{getattr(ty, '__name__', 'string')}"
                    )


def listed_models(config) -> List[ModelReference]:
    """Models the user wrote under models:/slices:/modules: (before mergekit adds the base)."""
    out: List[ModelReference] = []
    for m in config.models or []:
        out.append(m.model)
    for s in config.slices or []:
        out.extend(src.model for src in s.sources)
    for mod in (config.modules or {}).values():
        out.extend(m.model for m in mod.models or [])
        for s in mod.slices or []:
            out.extend(src.model for src in s.sources)
    return list(dict.fromkeys(out))


def _check_value(name: str, value: Any, where: str) -> None:
    def bad(rule: str) -> ChainConfigError:
        return ChainConfigError(f"parameter '{name}' = {value!r} {where} {rule}")

    if isinstance(value, float) and not math.isfinite(value):
        raise bad("must be a finite number")
    if name == "alpha" and not 0.0 <= value <= 1.0:
        raise bad("must be in [0, 1]")
    if name in ("num_samples", "max_seq_len", "batch_size") and value <= 0:
        raise bad("must be a positive integer")
    if name in ("ridge", "weight", "activation_budget") and value < 0:
        raise bad("must be >= 0")
    if name == "chain" and value not in CHAINS:
        raise bad(f"must be one of {', '.join(CHAINS)}")
    if name == "objective" and value not in OBJECTIVES:
        raise bad(f"must be one of {', '.join(OBJECTIVES)}")
    if name == "fallback" and value not in FALLBACKS:
        raise bad(f"must be one of {', '.join(FALLBACKS)}")
    if name == "activation_dtype" and value not in ACTIVATION_DTYPES:
        raise bad(f"must be one of {', '.join(ACTIVATION_DTYPES)}")


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


def check_same_experts(save_tasks: List[SaveTensor], experts: List[ModelReference], listed, base) -> None:
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
            _check_value(name, value, f"(at {save.tensor_name})")
            if name in GLOBAL_ONLY:
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
                    _check_value(name, value, f"of model {model}")
            if model in experts:
                seen, where = calibrations.setdefault(model, (params.get("calibration"), save.tensor_name))
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


# ---------------------------------------------------------------- planning


def _plan_chain(planner: MergePlanner, out_path: str, original) -> List[Task]:
    from mergekit_com import preflight
    from mergekit_com.workdir import ACTIVE

    config = planner.config
    work = ACTIVE.get()
    check_parameter_names(config)
    check_options(planner.options)
    if work is None:  # planned without staged_merge.run_chain_merge, which checks them first
        preflight.check_models(config, planner.options)
    listed = listed_models(config)
    base = config.base_model
    out_cfg = planner.out_model_config
    support.check_model_kind(out_cfg, planner.arch_info)
    model = support.meta_model(out_cfg, planner.options.trust_remote_code)

    tasks = original(planner, out_path)
    save_tasks = [t for t in tasks if isinstance(t, SaveTensor)]
    finalize = next(t for t in tasks if isinstance(t, FinalizeModel))
    tokenizer = next((t for t in tasks if isinstance(t, BuildTokenizer)), None)

    models_in = [m for s in save_tasks for m in s.tensor_task.model_order]
    experts = [m for m in dict.fromkeys(models_in) if m != base or m in listed]
    if not experts:
        raise ChainConfigError(f"{METHOD_NAME} needs at least one expert under models:")
    check_same_experts(save_tasks, experts, listed, base)
    check_planned_values(save_tasks, experts, base)
    first = save_tasks[0].tensor_task
    preflight.check_calibration(
        experts,
        {m: first.input_parameters.get(m, {}).get("calibration") for m in experts},
        first.parameters["num_samples"],
        first.parameters["max_seq_len"],
        planner.options,
        shared_tokenizer=tokenizer is not None,
    )
    preflight.scan_weights(preflight.ordered_models(config), planner.options)

    module_name = next(iter(planner.arch_info.modules))
    arch = planner._out_module_arch(module_name)
    planned = {s.tensor_name for s in save_tasks}

    def names(weights) -> Tuple[str, ...]:
        return tuple(w.name for w in weights if w.name in planned)

    num_layers = planner._current_module_layers
    layers = tuple(names(arch.layer_weights(i)) for i in range(num_layers))
    if num_layers == 0 or not layers[0]:
        raise ChainConfigError(f"{METHOD_NAME}: the output model has no decoder layers to walk")
    pre, post = names(arch.pre_weights()), names(arch.post_weights())
    # The output head is solved after the layers; mergekit's inferred
    # architectures (no JSON definition) list every non-layer tensor as "pre".
    head = _head_name(model)
    moved = tuple(n for n in pre if n.rpartition(".")[0] == head)
    layout = ChainLayout(
        pre=tuple(n for n in pre if n not in moved),
        layers=layers,
        post=post + moved,
        first_layer_weight=layers[0][0],
    )
    layers_name, decoder_layers = find_layer_list(model, layout.first_layer_weight)
    support.check_layers(model, decoder_layers, layers_name)
    support.check_coverage(model, layout.layers, layout.pre + layout.post,
                           support.architecture_name(out_cfg))
    # mergekit takes the output configuration from the base model, else the first one
    config_source = base or config.referenced_models()[0]
    chain = ChainOfMergesTask(
        save_tasks=tuple(save_tasks),
        writer_task=finalize.writer_task,
        tokenizer_task=tokenizer,
        layout=layout,
        out_config=out_cfg.to_json_string(use_diff=False),
        config_source=config_source,
        experts=tuple(experts),
        referenced=tuple(config.referenced_models()),
        chat_template=config.chat_template,
        options=planner.options,
        checkpoint_dir=work.checkpoints.path if work is not None else None,
    )
    card.remember_run(config, out_path)
    return [chain] + ([tokenizer] if tokenizer is not None else [])


def _head_name(model) -> Optional[str]:
    """The module name of the output embeddings (``lm_head``), if the model has one."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)


def patch_planner() -> None:
    """Route chain_of_merges plans through the chain task (and its cards through
    ``card.py``); other methods untouched."""
    card.patch_card()
    if getattr(MergePlanner.plan_to_disk, "_mergekit_com", False):
        return
    original = MergePlanner.plan_to_disk

    @functools.wraps(original)
    def plan_to_disk(self: MergePlanner, out_path: str):
        if self.config.merge_method != METHOD_NAME:
            return original(self, out_path)
        return _plan_chain(self, out_path, original)

    plan_to_disk._mergekit_com = True
    MergePlanner.plan_to_disk = plan_to_disk


patch_planner()
