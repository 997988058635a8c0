"""Planning a chain_of_merges merge: mergekit's plan, handed to one chain task.

mergekit plans one independent task per output tensor. For
``merge_method: chain_of_merges`` its planner still plans them all (so
loading, LoRA, vocabulary permutation, parameter filters and writing stay
mergekit's); ``plan_chain`` then checks the plan and returns one
``ChainOfMergesTask`` that executes those per-tensor tasks itself, layer by
layer in forward order, with the calibration walk in between.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from mergekit.architecture.base import ConfiguredModuleArchitecture
from mergekit.graph import Task
from mergekit.io.tasks import FinalizeModel, SaveTensor
from mergekit.plan import MergePlanner
from mergekit.tokenizer import BuildTokenizer

from mergekit_com.errors import ChainConfigError
from mergekit_com.integration import mergekit_internals, preflight, support
from mergekit_com.integration.chain_task import ChainOfMergesTask
from mergekit_com.integration.config_views import listed_experts, ordered_models
from mergekit_com.integration.staged_merge import ACTIVE
from mergekit_com.integration.validation import (
    check_distinct_experts,
    check_options,
    check_parameter_names,
    check_planned_values,
    check_same_experts,
    fit_max_seq_len,
    sets_parameter,
)
from mergekit_com.method.parameters import METHOD_NAME
from mergekit_com.model.stepping import find_layer_list


def plan_chain(planner: MergePlanner, out_path: str,
               plan_to_disk: Callable[[MergePlanner, str], List[Task]]) -> List[Task]:
    """Checks, mergekit's own plan (``plan_to_disk``), then the chain task."""
    config, options = planner.config, planner.options
    work = ACTIVE.get()
    check_parameter_names(config)
    check_options(options)
    if work is None:  # planned without staged_merge.run_chain_merge, which checks them first
        preflight.check_models(config, options)
    listed = listed_experts(config)
    base = config.base_model
    out_cfg = planner.out_model_config
    support.check_model_kind(out_cfg, planner.arch_info)
    model = support.meta_model(out_cfg, options.trust_remote_code)

    tasks = plan_to_disk(planner, out_path)
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
    check_distinct_experts(experts, {m: first.input_parameters.get(m, {}) for m in experts})
    max_seq_len = fit_max_seq_len(first.parameters["max_seq_len"], out_cfg,
                                  explicit=sets_parameter(config, "max_seq_len"))
    preflight.check_calibration(
        experts,
        {m: first.input_parameters.get(m, {}) for m in experts},
        first.parameters["num_samples"],
        max_seq_len,
        options,
        shared_tokenizer=tokenizer is not None,
        chat_template=mergekit_internals.resolve_chat_template(
            config.chat_template, config.referenced_models(), options.trust_remote_code),
    )
    preflight.scan_weights(ordered_models(config), options)

    pre, layers, post = _layout(planner, {s.tensor_name for s in save_tasks}, model)
    layers_name, decoder_layers = find_layer_list(model, layers[0][0])
    support.check_layers(model, decoder_layers, layers_name)
    support.check_coverage(model, layers, pre + post, support.architecture_name(out_cfg))
    preflight.check_planned_tensors(save_tasks, support.architecture_name(out_cfg))
    chain = ChainOfMergesTask(
        save_tasks=tuple(save_tasks),
        writer_task=finalize.writer_task,
        tokenizer_task=tokenizer,
        layout_pre=pre,
        layout_layers=layers,
        layout_post=post,
        out_config=out_cfg.to_json_string(use_diff=False),
        # mergekit takes the output configuration from the base model, else the first one
        config_source=base or config.referenced_models()[0],
        experts=tuple(experts),
        base_model=base,
        referenced=tuple(config.referenced_models()),
        chat_template=config.chat_template,
        options=options,
        checkpoint_dir=work.checkpoints.path if work is not None else None,
        max_seq_len=max_seq_len,
        compute_dtype="float64" if config.dtype == "float64" else "float32",
    )
    return [chain] + ([tokenizer] if tokenizer is not None else [])


def _layout(planner: MergePlanner, planned, model) -> Tuple[tuple, tuple, tuple]:
    """Planned tensor names in forward order: before, per decoder layer, after the layers."""
    module_name = next(iter(planner.arch_info.modules))  # support.check_model_kind: one module
    module = planner.arch_info.modules[module_name]
    arch = ConfiguredModuleArchitecture(info=module.architecture, config=planner.out_model_config,
                                        weight_prefix=module.weight_prefix)

    def names(weights) -> Tuple[str, ...]:
        return tuple(w.name for w in weights if w.name in planned)

    layers = tuple(names(arch.layer_weights(i)) for i in range(arch.num_layers()))
    if not layers or not layers[0]:
        raise ChainConfigError(f"{METHOD_NAME}: the output model has no decoder layers to walk")
    pre, post = names(arch.pre_weights()), names(arch.post_weights())
    # The output head is solved after the layers; mergekit's inferred
    # architectures (no JSON definition) list every non-layer tensor as "pre".
    head = _head_name(model)
    moved = tuple(n for n in pre if n.rpartition(".")[0] == head)
    return tuple(n for n in pre if n not in moved), layers, post + moved


def _head_name(model) -> Optional[str]:
    """The module name of the output embeddings (``lm_head``), if the model has one."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)
