"""Config checks that stop a chain_of_merges run before any work, naming what to fix."""

from __future__ import annotations

import difflib
import logging
import os
import typing
from typing import Any, Dict, List, Optional, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import SaveTensor
from mergekit.options import MergeOptions
from pydantic import TypeAdapter, ValidationError

from mergekit_com.errors import ChainConfigError
from mergekit_com.integration import mergekit_internals
from mergekit_com.integration.config_views import (
    listed_models,
    model_lists,
    parameter_scopes,
    scalars,
    slice_lists,
)
from mergekit_com.io.datasets_source import SPEC_PARAMETERS, is_hub_id
from mergekit_com.method.parameters import (
    METHOD_NAME,
    PARAMETERS,
    WALK_WIDE,
    check_value,
)

LOG = logging.getLogger("mergekit.chain_of_merges.validation")
# Weights are relative (only their ratios matter to a solve or an average); far larger
# values overflow the float32 statistics they scale.
MAX_WEIGHT = 1e6


def check_merge_method(name: str) -> None:
    """An unknown ``merge_method`` names the closest known one (mergekit raises at planning)."""
    from mergekit.merge_methods import registry

    known = sorted(m.spec.name for m in registry.registered_methods())
    if name in known:
        return
    raise ChainConfigError(
        f"merge_method '{name}' is not a mergekit merge method; {_did_you_mean(name, known)}known methods: "
        f"{', '.join(known)}"
    )


def check_listed_once(config) -> None:
    """mergekit refuses a model listed twice in one list with a traceback; say it in one line."""
    for where, models in model_lists(config):
        seen = set()
        for model in models:
            if model in seen:
                raise ChainConfigError(
                    f"model {model} is listed twice under {where}; list each model once "
                    "(to count it more, give it a larger `weight`)"
                )
            seen.add(model)


def check_base_spelled_once(config) -> None:
    """A listed model that is the base_model's folder written another way (``./m``, ``m/``)
    is two models to mergekit, and would be an expert while the base is not: say so."""
    base = config.base_model
    if base is None:
        return
    for model in listed_models(config):
        if model != base and _place(model) == _place(base):
            raise ChainConfigError(
                f"model {model} and base_model {base} are one folder written two ways; write "
                "it the same way in both places (listed without a `calibration` of its own, "
                "the base stays the base)")


def check_config(config) -> None:
    """What a chain_of_merges configuration holds, checked before anything is read."""
    check_config_values(config)
    check_parameter_names(config)
    check_listed_once(config)
    check_base_spelled_once(config)
    check_base_in_slices(config)


def check_base_in_slices(config) -> None:
    """mergekit needs a ``base_model`` among every slice's sources (it raises a
    traceback otherwise); say so in one line, with how CoM reads it there."""
    base = config.base_model
    for where, slices in slice_lists(config):
        for si, piece in enumerate(slices):
            if base is not None and all(src.model != base for src in piece.sources):
                raise ChainConfigError(
                    f"{where}[{si}]: base_model {base} is not among its sources, which mergekit "
                    "needs with slices; list it there with the same layer_range (without a "
                    "`calibration` of its own it stays the base, not an expert)"
                )


def _place(model) -> tuple:
    """What a model reference reads: a local folder by its real path (``./m``, ``m/`` and
    ``x/../m`` are one model), a Hub id as written; with its revision and adapter."""
    def where(path) -> Optional[tuple]:
        if path is None:
            return None
        local = os.path.realpath(path.path) if os.path.exists(path.path) else path.path
        return (local, path.revision)

    return (where(model.model), where(model.lora))


def check_distinct_experts(experts, parameters) -> None:
    """Two experts that are one model (two spellings of a folder, or a link to it)
    calibrated on the same data are one expert counted twice: mergekit sees two models.
    The same model on different data is kept (each copy brings its own statistics)."""
    seen = {}
    for model in experts:
        params = parameters[model]
        key = (_place(model), str(params.get("calibration")),
               tuple(str(params.get(k)) for k in SPEC_PARAMETERS))
        if key in seen:
            raise ChainConfigError(
                f"models {seen[key]} and {model} are one model with the same calibration data, "
                "so it would count twice; list it once (to count it more, give it a larger "
                "`weight`)"
            )
        seen[key] = model


def _has_type(ty, value) -> bool:
    if isinstance(value, bool) and ty in (int, float):
        return False  # YAML `true` is no number, though pydantic would take it as 1
    try:
        TypeAdapter(ty).validate_python(value)
    except ValidationError:
        return False
    return True


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _type_name(ty) -> str:
    """A parameter's type as a config's author reads it (``Optional[str]``: a string)."""
    if typing.get_origin(ty) is typing.Union:
        return " or ".join(_type_name(t) for t in typing.get_args(ty) if t is not type(None))
    return _TYPE_NAMES.get(ty, f"a {getattr(ty, '__name__', 'value')}")


def check_parameter_names(config) -> None:
    """Unknown names and values of the wrong type, before mergekit plans anything."""
    valid = sorted(PARAMETERS)
    for where, params, per_model in parameter_scopes(config):
        for name, setting in (params or {}).items():
            if name not in PARAMETERS:
                raise ChainConfigError(
                    f"{where}: unknown parameter '{name}' for {METHOD_NAME}; "
                    f"{_did_you_mean(name, valid)}valid parameters: {', '.join(valid)}"
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
                        f"{where}: parameter '{name}' = {value!r} is not {_type_name(parameter.type)}"
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
    if device.type == "meta":
        raise ChainConfigError(
            "--device meta holds no values, so there is nothing to merge on it; use --device "
            "cpu, cuda or auto"
        )
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
    calibrations: Dict[ModelReference, Tuple[Dict[str, Any], str]] = {}
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
                if name == "weight" and value is not None and value > MAX_WEIGHT:
                    raise ChainConfigError(
                        f"parameter 'weight' = {value!r} of model {model} must be at most "
                        f"{MAX_WEIGHT:g}: weights are relative, and larger ones overflow the "
                        "merge's float32 statistics"
                    )
            if model in experts:
                settings = {n: params.get(n) for n in ("calibration", *SPEC_PARAMETERS)}
                seen, where = calibrations.setdefault(model, (settings, save.tensor_name))
                for name in settings:
                    if seen[name] != settings[name]:
                        raise ChainConfigError(
                            f"model {model} has {name} {seen[name]!r} for {where} but "
                            f"{settings[name]!r} for {save.tensor_name}; give one {name} per "
                            "model (the same in every slice)"
                        )
        weights = [task.input_parameters.get(m, {}).get("weight") for m in experts
                   if m in task.input_parameters]
        if weights and not any(weights):
            raise ChainConfigError(
                f"every model has weight 0 (at {save.tensor_name}); give at least one model "
                "a positive `weight`"
            )
    if not save_tasks:
        return
    for model in experts:
        calibration = calibrations.get(model, ({}, ""))[0].get("calibration")
        if not calibration:
            raise ChainConfigError(
                f"model {model} has no `calibration` parameter; give every expert calibration "
                "data (parameters: {calibration: data.jsonl or org/dataset}), under the model "
                "or once under the top-level parameters:"
            )
        if not is_hub_id(calibration) and not os.path.exists(
                os.path.abspath(os.path.expanduser(calibration))):
            raise ChainConfigError(
                f"calibration file {calibration} (for model {model}) does not exist; fix the "
                "path (relative paths are resolved from the working directory)"
            )


def fit_max_seq_len(value: int, out_config, explicit: bool) -> int:
    """``max_seq_len`` within the model's positions: beyond them a forward pass fails or
    extrapolates. Clamped, with a warning when the value was set in the config."""
    limit: Optional[int] = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        limit = getattr(out_config, key, None)
        if isinstance(limit, int) and limit > 0:
            break
        limit = None
    if limit is None or value <= limit:
        return value
    if explicit:
        LOG.warning("max_seq_len %d is more than the model's %d positions (%s); using %d",
                    value, limit, key, limit)
    return limit


def sets_parameter(config, name: str) -> bool:
    """Whether the config writes ``name`` anywhere (else it is the default)."""
    return any(name in (params or {}) for _where, params, _ in parameter_scopes(config))


# ---------------------------------------------------------------- mergekit's own settings
# mergekit's pydantic models ignore keys they do not know, so a misspelt `paramters:` (or a
# model's `parameter:`) would silently drop everything under it.
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _did_you_mean(value: Any, known) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_config_keys(config_source: Optional[str]) -> None:
    """The keys of the YAML as written (top level, and each of ``models:``) that mergekit's
    configuration does not have."""
    import yaml
    from mergekit.config import InputModelDefinition, MergeConfiguration

    if not isinstance(config_source, str):
        return  # a MergeConfiguration built in Python: no YAML to read
    try:
        raw = yaml.safe_load(config_source)
    except yaml.YAMLError:
        return  # mergekit parsed it already
    if not isinstance(raw, dict):
        return
    entries = [("config", raw, MergeConfiguration.model_fields)]
    entries += [(f"models[{i}]", entry, InputModelDefinition.model_fields)
                for i, entry in enumerate(raw.get("models") or []) if isinstance(entry, dict)]
    for where, mapping, known in entries:
        for key in mapping:
            if key not in known:
                raise ChainConfigError(
                    f"{where}: unknown key '{key}' (mergekit would ignore it and everything "
                    f"under it); {_did_you_mean(key, known)}valid keys: {', '.join(sorted(known))}")


def check_config_values(config) -> None:
    """mergekit's own settings that would otherwise fail with a traceback mid-merge (or
    write a chat template that cannot be rendered)."""
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key, None)
        if value is not None and str(value).replace("torch.", "", 1) not in FLOAT_DTYPES:
            raise ChainConfigError(
                f"{key} '{value}' is not a dtype {METHOD_NAME} can merge in; "
                f"{_did_you_mean(value, FLOAT_DTYPES)}use one of {', '.join(FLOAT_DTYPES)}")
    _check_chat_template(getattr(config, "chat_template", None))
    source = getattr(config, "tokenizer_source", None)
    if isinstance(source, ModelReference):
        path = source.model.path
        if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise ChainConfigError(
                f"tokenizer_source {path} is not a directory; give a model folder that has "
                "tokenizer files, a Hub model id, base, or union")


def _check_chat_template(template: Optional[str]) -> None:
    """As ``mergekit.merge`` reads ``chat_template``: a name of its own templates, ``auto``,
    or a Jinja template (at least 20 characters, with a ``{``), which must parse."""
    if not template or template == "auto":
        return
    import jinja2

    names = mergekit_internals.chat_template_names()
    if "{" not in template:
        if template not in names:
            raise ChainConfigError(
                f"chat_template '{template}' is neither a template mergekit knows nor a Jinja "
                f"template; {_did_you_mean(template, names)}named templates: {', '.join(names)}, "
                "or auto")
        return
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChainConfigError(
            f"chat_template is not a valid Jinja template ({e.message}, line {e.lineno})") from None
    if len(template) < 20:
        raise ChainConfigError(
            f"chat_template {template!r} is too short for mergekit to take as a template (20 "
            "characters at least); give the whole template, a named one, or auto")


def check_stages(configs) -> None:
    """``mergekit-multi``'s stages (name -> configuration; None: the final, unnamed one):
    each chain_of_merges stage's own configuration, before any stage runs, naming the stage."""
    for name, config in configs.items():
        if config.merge_method != METHOD_NAME:
            continue
        try:
            check_config(config)
        except ChainConfigError as e:
            stage = f"stage {name}" if name else "the final stage (--out-path)"
            raise ChainConfigError(f"{stage}: {e}") from None
