"""The one mergekit task that runs a whole chain_of_merges plan.

The planner (``planner.py``) still plans every per-tensor task, so loading,
LoRA references, vocabulary permutation, parameter resolution (filters,
slices, gradients) and the writer stay mergekit's. This task executes them
itself, layer by layer in forward order, with the walk in between:
``MergekitTensors`` is the walk's tensor port (``method/ports.py``) on top of
mergekit's gather tasks and ``SaveTensor``; everything else is set up here.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import tqdm
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Executor, Task, TaskUniverse
from mergekit.io.tasks import LoaderCache, SaveTensor, TensorWriterTask
from mergekit.merge_methods.buffers import copy_non_floating_buffer
from mergekit.options import MergeOptions
from mergekit.tokenizer import BuildTokenizer

from mergekit_com.integration import mergekit_internals, output, preflight
from mergekit_com.integration.models import model_tokenizer
from mergekit_com.io.calibration import load_calibration, make_batches
from mergekit_com.io.datasets_source import RecordSpec
from mergekit_com.io.report import MergeReport, summarize
from mergekit_com.io.checkpoints import LayerCheckpoints
from mergekit_com.method import allocator, distributed
from mergekit_com.method.fallback import fallback_merge
from mergekit_com.method.parameters import (
    PARAMETERS,
    Fallback,
    SolveSettings,
    WalkSettings,
)
from mergekit_com.method.ports import Gathered, Written
from mergekit_com.method.timing import PHASES
from mergekit_com.method.walk import ChainWalk, Layout
from mergekit_com.model.stepping import ModelShell

LOG = logging.getLogger("mergekit.chain_of_merges.walk")

# The walk ``run_chain`` runs; the benchmark puts its naive reference chain here.
walk_class = ChainWalk


class ChainOfMergesTask(Task[None]):
    save_tasks: Tuple[SaveTensor, ...]
    writer_task: TensorWriterTask
    tokenizer_task: Optional[BuildTokenizer] = None
    layout_pre: Tuple[str, ...]
    layout_layers: Tuple[Tuple[str, ...], ...]
    layout_post: Tuple[str, ...]
    out_config: str
    config_source: ModelReference  # whose configuration class the output uses
    experts: Tuple[ModelReference, ...]
    base_model: Optional[ModelReference] = None
    referenced: Tuple[ModelReference, ...]  # for chat_template: auto
    chat_template: Optional[str] = None
    options: MergeOptions
    checkpoint_dir: Optional[str] = None  # where completed layers are saved (None: no resume)
    max_seq_len: Optional[int] = None  # as fitted to the model's positions (None: as configured)
    compute_dtype: str = "float32"  # "float64" when the config reads the models in float64

    def arguments(self) -> Dict[str, Task]:
        args: Dict[str, Task] = {"writer": self.writer_task}
        if self.tokenizer_task is not None:
            args["tokenizer"] = self.tokenizer_task
        return args

    def main_thread_only(self) -> bool:
        return True

    def execute(self, writer, tokenizer=None) -> None:
        run_chain(self, writer, tokenizer)
        if not distributed.is_writer():
            return  # other ranks only contribute calibration statistics
        writer.finalize()
        out_path = self.writer_task.out_path
        output.copy_generation_config([self.config_source, *self.experts], out_path, self.options)
        output.copy_remote_code(self.config_source, out_path, self.options)


class MergekitTensors:
    """The walk's ``TensorIO``: mergekit's gather tasks in, its ``SaveTensor`` out."""

    def __init__(self, task: ChainOfMergesTask, writer, tokenizer_info, device: torch.device):
        self.saves = {s.tensor_name: s for s in task.save_tasks}
        self.experts, self.base = list(task.experts), task.base_model
        self.writer, self.device = writer, device
        self.universe = TaskUniverse()
        self.cached = {}
        if task.tokenizer_task is not None:  # the vocabulary permutation needs its value
            self.cached[self.universe.add_task(task.tokenizer_task)] = tokenizer_info

    def read(self, names: Sequence[str]) -> Gathered:
        wanted = {self.saves[n].tensor_task.gather_tensors: n for n in names}
        handles = [self.universe.add_task(t) for t in wanted]
        executor = Executor(handles, math_device=self.device, storage_device=self.device,
                            cached_values=self.cached)
        with PHASES.phase("load"):
            return {wanted[t]: value for t, value in executor.run(quiet=True)}

    def _in_order(self, name: str, tensors: Dict[Hashable, torch.Tensor]) -> List[torch.Tensor]:
        return [tensors[m] for m in self.saves[name].tensor_task.model_order if m in tensors]

    def write_fallback(self, name: str, tensors: Dict[Hashable, torch.Tensor]) -> torch.Tensor:
        task = self.saves[name].tensor_task
        ordered = self._in_order(name, tensors)
        value = copy_non_floating_buffer(ordered, name)
        if value is None:
            dtype = functools.reduce(torch.promote_types, (t.dtype for t in ordered))
            experts = {m: tensors[m].to(dtype) for m in task.model_order
                       if m in tensors and m in self.experts}
            base = tensors.get(self.base)
            value = fallback_merge(
                experts, {m: task.input_parameters[m]["weight"] for m in experts},
                rule=Fallback(task.parameters["fallback"]), scale=task.parameters["lambda"],
                base=None if base is None else base.to(dtype), name=name,
            )
            value = ordered[0] if value is None else value.to(dtype)  # e.g. a tensor only the base has
        return self._save(name, value)

    def write_solved(self, name: str, value: torch.Tensor,
                     tensors: Dict[Hashable, torch.Tensor]) -> torch.Tensor:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in self._in_order(name, tensors)))
        return self._save(name, value.to(dtype))

    def _save(self, name: str, value: torch.Tensor) -> torch.Tensor:
        save = self.saves[name]
        with PHASES.phase("write"):
            if save.dtype:
                value = value.to(dtype_from_name(save.dtype))
            if distributed.is_writer():
                self.writer.save_tensor(name=name, tensor=value, clone=save.clone)
        return value

    def rewrite(self, name: str, written: torch.Tensor) -> None:
        if distributed.is_writer():
            self.writer.save_tensor(name=name, tensor=written, clone=self.saves[name].clone)

    def solve_settings(self, name: str) -> SolveSettings:
        task = self.saves[name].tensor_task
        return SolveSettings(
            alpha=task.parameters["alpha"], ridge=task.parameters["ridge"],
            weights=tuple(task.input_parameters[m]["weight"] for m in self.experts),
            blend=task.parameters["blend"],
        )

    def end_layer(self) -> None:
        LoaderCache().flush_all()


class WriterCheckpoints(LayerCheckpoints):
    """Every rank reads the checkpoints; only the writing rank saves them."""

    def save(self, key, written: Written, report: Optional[dict] = None) -> None:
        if distributed.is_writer():
            super().save(key, written, report)


class BarProgress:
    """The walk's progress on a tqdm bar: one step per layer, the current work as postfix."""

    def __init__(self, bar: tqdm.tqdm):
        self.bar = bar

    def status(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def layer_done(self) -> None:
        self.bar.update(1)


def _first_parameters(task: ChainOfMergesTask):
    return task.save_tasks[0].tensor_task


def walk_settings(task: ChainOfMergesTask) -> WalkSettings:
    """The walk-wide values (checked at planning to be the same for every tensor)."""
    return WalkSettings.from_values(dict(_first_parameters(task).parameters.items()))


def parameter_summary(task: ChainOfMergesTask) -> Dict[str, object]:
    """Every merge-wide parameter as resolved across all tensors (for the report and card);
    ``max_seq_len`` as used, cut to the model's positions where it had fewer."""
    summary = {
        name: summarize(s.tensor_task.parameters[name] for s in task.save_tasks)
        for name, p in PARAMETERS.items() if not p.per_model
    }
    if task.max_seq_len:
        summary["max_seq_len"] = task.max_seq_len
    return summary


def load_batches(task: ChainOfMergesTask, tokenizer, report: MergeReport,
                 batch_size: int) -> Dict[ModelReference, List]:
    """Every expert's calibration data, tokenized and batched (this rank's share)."""
    first = _first_parameters(task)
    num_samples = first.parameters["num_samples"]
    # records are cut to the model's positions (task.max_seq_len); a batch still holds
    # the batch_size x max_seq_len tokens the config asks for (so more, shorter records)
    max_seq_len = task.max_seq_len or first.parameters["max_seq_len"]
    max_tokens = batch_size * first.parameters["max_seq_len"]
    template = mergekit_internals.resolve_chat_template(task.chat_template, task.referenced,
                                             task.options.trust_remote_code)
    out = {}
    for index, model in enumerate(tqdm.tqdm(task.experts, desc="Loading calibration",
                                            unit="expert", disable=task.options.quiet)):
        params = first.input_parameters[model]
        spec = RecordSpec.from_parameters(params)
        # The pre-flight check tokenized it with the model's own tokenizer, its chats
        # rendered as the walk renders them: that is this data unless the merge sets a
        # tokenizer_source.
        checked = None if tokenizer is not None else preflight.take_checked_calibration(
            model, params["calibration"], num_samples, max_seq_len, spec, template)
        if checked is not None:
            cal, pad = checked
        else:
            # With tokenizer_source the embeddings are permuted to the output
            # vocabulary, so every expert's data must be tokenized with it; its chats are
            # rendered with the config's template, or the expert's own, or the output's.
            tok = tokenizer or model_tokenizer(model, task.options)
            own = preflight.own_chat_template(model) if tokenizer is not None else None
            owner = ("its model's tokenizer" if tokenizer is None else
                     "neither its model's tokenizer nor the output tokenizer (tokenizer_source)")
            with PHASES.phase("load"):
                # checked (and short files reported) when the merge was planned
                cal = load_calibration(params["calibration"], tok, num_samples, max_seq_len,
                                       model=model, warn_short=False, spec=spec,
                                       chat_template=template or own, owner=owner)
            pad = preflight.pad_id(tok, None)
        LOG.info("%s: %d records, %d tokens from %s", model, cal.num_records, cal.num_tokens,
                 cal.path)
        weight = summarize(s.tensor_task.input_parameters[model]["weight"] for s in task.save_tasks)
        report.set_calibration(index, cal, weight)
        # Under torchrun each rank calibrates on a disjoint share of the batches. Sharding
        # whole batches (not samples) keeps every batch's padding and Gram what one
        # process computes, so ranks change only the order of float64 sums.
        batches = make_batches(cal.sequences, batch_size, pad_id=pad, max_tokens=max_tokens)
        out[model] = distributed.shard(batches, f"expert {model}'s calibration (batch_size "
                                                f"{batch_size})")
    return out


def walk_device(options) -> torch.device:
    """Where the walk runs (``--device``/``--cuda``; mergekit's default is the CPU)."""
    return torch.device(options.device or "cpu")


def run_chain(task: ChainOfMergesTask, writer, tokenizer_info=None) -> None:
    """Walk, write every tensor, and leave ``com_report.json`` in the output folder."""
    device = walk_device(task.options)
    malloc_tuned = allocator.tune_malloc()  # once per process: set already under mergekit-yaml
    distributed.setup(device)
    threads = distributed.cpu_threads(task.options.num_threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _walk(task, writer, tokenizer_info, device, threads, malloc_tuned)
    finally:  # a process that merges in-process keeps its own setting
        torch.set_num_threads(previous)


def _walk(task: ChainOfMergesTask, writer, tokenizer_info, device: torch.device, threads: int,
          malloc_tuned: bool) -> None:
    LOG.info("walking on %s with %d CPU thread(s), rank %d of %d", device, threads,
             distributed.rank(), distributed.world_size())
    settings = walk_settings(task)
    config = _out_config(task)
    # `dtype: float64` computes everything in float64 (a reference); else float32
    compute = torch.float64 if task.compute_dtype == "float64" else torch.float32
    shell = ModelShell(config, task.layout_layers[0][0], device,
                       trust_remote_code=task.options.trust_remote_code, dtype=compute)
    report = MergeReport([str(m) for m in task.experts], parameter_summary(task))
    batches = load_batches(task, getattr(tokenizer_info, "tokenizer", None), report,
                           settings.batch_size)
    # one bar for the walk: its tensors are written as each layer is merged
    walk_bar = tqdm.tqdm(total=shell.num_layers, desc="Chain of Merges", unit="layer",
                         disable=task.options.quiet)
    try:
        walk_class(
            shell, Layout(task.layout_pre, task.layout_layers, task.layout_post),
            MergekitTensors(task, writer, tokenizer_info, device), report, settings,
            batches, tied=bool(getattr(config, "tie_word_embeddings", False)), device=device,
            checkpoints=(WriterCheckpoints(task.checkpoint_dir, discard=distributed.is_writer())
                         if task.checkpoint_dir else None),
            progress=BarProgress(walk_bar),
        ).run()
    finally:
        walk_bar.close()
    report.runtime = {"device": str(device), "cpu_threads": threads,
                      "ranks": distributed.world_size(), "malloc_tuned": malloc_tuned}
    if distributed.is_writer():
        report.write(task.writer_task.out_path)


def _out_config(task: ChainOfMergesTask):
    """The output configuration, as the class its source model uses (custom code too)."""
    trust = task.options.trust_remote_code
    config = type(task.config_source.config(trust_remote_code=trust)).from_dict(
        json.loads(task.out_config))
    if not getattr(config, "_name_or_path", None):
        # transformers finds remote code relative to this path
        config._name_or_path = task.config_source.model.path
    return config
