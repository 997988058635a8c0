"""Read-only views of a mergekit ``MergeConfiguration``: the models and the
``parameters:`` mappings a user wrote, wherever the config syntax puts them."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

from mergekit.common import ModelReference


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


def listed_experts(config) -> List[ModelReference]:
    """The listed models that are experts: all of them, except a ``base_model`` whose
    entries (under ``models:``, or as a slice source, where mergekit needs the base in
    every slice) give it no ``calibration`` of its own: it stays the base, as when it is
    not listed (``models:`` and the ``slices:`` mergekit makes of them agree). A
    top-level ``calibration`` default does not make it an expert."""
    base = config.base_model
    listed = listed_models(config)
    if base is None or base not in listed:
        return listed
    entries = [m for m in _all_model_entries(config) if m.model == base]
    entries += [src for s in _all_slices(config) for src in s.sources if src.model == base]
    own_data = any("calibration" in (e.parameters or {}) for e in entries)
    return listed if own_data else [m for m in listed if m != base]


def slice_lists(config) -> Iterable[Tuple[str, List]]:
    """Each ``slices:`` list a user wrote, with where it is."""
    yield "slices", list(config.slices or [])
    for name, mod in (config.modules or {}).items():
        yield f"modules.{name}.slices", list(mod.slices or [])


def _all_slices(config) -> List:
    return [s for _, slices in slice_lists(config) for s in slices]


def _all_model_entries(config) -> List:
    return list(config.models or []) + [m for mod in (config.modules or {}).values()
                                        for m in mod.models or []]


def model_lists(config) -> Iterable[Tuple[str, List[ModelReference]]]:
    """Each list of models a user wrote, with where it is (a model may appear once in each)."""
    yield "models:", [m.model for m in config.models or []]
    for si, s in enumerate(config.slices or []):
        yield f"slices[{si}].sources", [src.model for src in s.sources]
    for name, mod in (config.modules or {}).items():
        yield f"modules.{name}.models", [m.model for m in mod.models or []]
        for si, s in enumerate(mod.slices or []):
            yield f"modules.{name}.slices[{si}].sources", [src.model for src in s.sources]


def ordered_models(config) -> List[ModelReference]:
    """Base first, then the experts in the order the config lists them."""
    out = [config.base_model] if config.base_model else []
    return list(dict.fromkeys(out + listed_models(config)))


def in_config_order(config, found) -> List[ModelReference]:
    """The models ``found`` (mergekit's ``referenced_models()``, a set's order) as the
    config lists them: base first, then in order; any other after, sorted."""
    ordered = [m for m in ordered_models(config) if m in found]
    return ordered + sorted(set(found) - set(ordered), key=str)


def parameter_scopes(config) -> Iterable[Tuple[str, Dict[str, Any], bool]]:
    """Every ``parameters:`` mapping a user can write: (where, mapping, is per-model)."""
    yield "parameters", config.parameters, False
    yield from _member_scopes(config, "")
    for name, mod in (config.modules or {}).items():
        yield f"modules.{name}", mod.parameters, False
        yield from _member_scopes(mod, f"modules.{name}.")


def _member_scopes(container, prefix: str) -> Iterable[Tuple[str, Dict[str, Any], bool]]:
    """The models' and slices' ``parameters:`` of a config or of one of its modules."""
    for i, m in enumerate(container.models or []):
        yield f"{prefix}models[{i}] ({m.model})", m.parameters, True
    for si, s in enumerate(container.slices or []):
        yield f"{prefix}slices[{si}]", s.parameters, False
        for j, src in enumerate(s.sources):
            yield f"{prefix}slices[{si}].sources[{j}] ({src.model})", src.parameters, True


def scalars(setting: Any) -> Iterable[Any]:
    """The plain values inside a setting (a scalar, a gradient, or filters)."""
    if isinstance(setting, list):
        for item in setting:
            yield from scalars(item)
    elif hasattr(setting, "value"):  # ConditionalParameter
        yield from scalars(setting.value)
    else:
        yield setting


def calibration_sources(config) -> List[str]:
    """Every `calibration` value written anywhere in the config."""
    found = []
    for _where, params, _per_model in parameter_scopes(config):
        for value in scalars((params or {}).get("calibration")):
            if isinstance(value, str) and value:
                found.append(value)
    return sorted(set(found))


def tokenizer_source(config):
    """``tokenizer.source`` or ``tokenizer_source``: set when mergekit builds the output vocabulary."""
    if config.tokenizer is not None:
        return config.tokenizer.source
    return config.tokenizer_source
