"""The Chain of Merges walk: merge layer l given the merged layers before it.

For each decoder layer, in forward order:
  1. load the K experts' tensors of that layer through mergekit's tasks;
  2. merge its non-linear tensors (norms, ...) by the fallback rule;
  3. for each group of linears sharing an input, in call order, accumulate
     every expert's input Gram from the cached activations (``chain``
     decides which weights produce them), solve, and install the merge;
  4. write the layer and push the cached activations one layer forward.
Then the same for the head (final norm, lm_head). The prefix is never re-run,
except on resume: the tensors written for every completed layer are kept in
a checkpoint (with the layer's report entries); a resumed walk writes them
again and runs the merged prefix on the calibration data to rebuild the
cached activations (the very same computation, so the result is
bit-identical on CPU).

Two activation streams are kept per expert, whatever the ``chain``: the
merged model's and the expert's own (unmerged) model's. The chain reads
the one it needs; the merge report (``report.py``) compares the two.
"""

from __future__ import annotations

import json
import logging
import types
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import tqdm

from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Executor, TaskUniverse
from mergekit.io.tasks import LoaderCache

from mergekit_com import distributed, linalg
from mergekit_com.activations import ActivationStore, CachedList, resolve_budget, resolve_dtype
from mergekit_com.calibration import CalibrationError, load_calibration, make_batches
from mergekit_com.method import PARAMETERS, ChainContext, activate, deactivate
from mergekit_com.report import MergeReport, summarize
from mergekit_com.timing import ORDER, PHASES
from mergekit_com.workdir import LayerCheckpoints, Record
from mergekit_com.walker import (
    ModelShell,
    capture_inputs,
    is_transposed,
    linear_call_groups,
    run_layer,
)

# A child of mergekit's logger: -v/-vv and any mergekit logging setup apply.
LOG = logging.getLogger("mergekit.chain_of_merges.engine")
HEAD = "head"

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class Settings:
    chain: str
    objective: str
    num_samples: int
    max_seq_len: int
    batch_size: int
    activation_dtype: str
    activation_budget: float
    calibration: Dict[ModelReference, str]


def read_settings(task) -> Settings:
    """The walk-wide values (validated at planning to be the same for every tensor).

    ``alpha``, ``ridge`` and ``weight`` are *not* here: they are read per
    tensor, so mergekit's filters and per-slice values apply.
    """
    first = task.save_tasks[0].tensor_task
    p = first.parameters
    return Settings(
        chain=p["chain"],
        objective=p["objective"],
        num_samples=p["num_samples"],
        max_seq_len=p["max_seq_len"],
        batch_size=p["batch_size"],
        activation_dtype=p["activation_dtype"],
        activation_budget=p["activation_budget"],
        calibration={m: first.input_parameters[m]["calibration"] for m in task.experts},
    )


def parameter_summary(task) -> Dict[str, object]:
    """Every merge-wide parameter as resolved across all tensors (for the report/card)."""
    return {
        name: summarize(s.tensor_task.parameters[name] for s in task.save_tasks)
        for name in PARAMETERS if name not in ("calibration", "weight")
    }


def load_out_config(text: str, source: ModelReference, trust_remote_code: bool):
    """The output configuration, as the class its source model uses (custom code too)."""
    data = json.loads(text)
    config = type(source.config(trust_remote_code=trust_remote_code)).from_dict(data)
    if not getattr(config, "_name_or_path", None):
        # transformers finds remote code relative to this path
        config._name_or_path = source.model.path
    return config


def model_tokenizer(model: ModelReference, options):
    """The expert's tokenizer; a LoRA-merged copy has none, so fall back to the
    adapter's folder, then the base model's."""
    from transformers import AutoTokenizer

    merged = model.merged(
        cache_dir=options.lora_merge_cache,
        trust_remote_code=options.trust_remote_code,
        lora_merge_dtype=options.lora_merge_dtype,
    )
    places = [merged.model] + ([model.lora, model.model] if model.lora else [])
    for place in places:
        try:
            return AutoTokenizer.from_pretrained(
                place.path, revision=place.revision,
                trust_remote_code=options.trust_remote_code,
            )
        except (OSError, ValueError, TypeError) as e:
            error = e
    raise CalibrationError(
        f"no tokenizer for model {model} (looked in {', '.join(p.path for p in places)}): "
        f"{error}; add tokenizer files or set tokenizer_source"
    )


class _RecordingWriter:
    """Passes tensors to mergekit's writer and remembers them for the checkpoint."""

    def __init__(self, writer):
        self.writer = writer
        self.records: List[Record] = []

    def save_tensor(self, name: str, tensor: torch.Tensor, clone: bool = False) -> None:
        self.writer.save_tensor(name=name, tensor=tensor, clone=clone)
        self.records.append((name, tensor, clone))

    def take(self) -> List[Record]:
        records, self.records = self.records, []
        return records


def resolve_chat_template(task) -> Optional[str]:
    """The template mergekit will give the output tokenizer (named, literal or auto)."""
    if not task.chat_template:
        return None
    from mergekit.merge import _set_chat_template  # mergekit's own resolution rules

    holder = types.SimpleNamespace(chat_template=None)
    config = types.SimpleNamespace(chat_template=task.chat_template,
                                   referenced_models=lambda: list(task.referenced))
    _set_chat_template(holder, config, trust_remote_code=task.options.trust_remote_code)
    return holder.chat_template


class _Walk:
    """State of one chain run: caches, the running merged tensors, the writer."""

    def __init__(self, task, writer, tokenizer_info):
        self.task = task
        self.writer = _RecordingWriter(writer)
        self.checkpoints = LayerCheckpoints(task.checkpoint_dir) if task.checkpoint_dir else None
        self._warned_rank = set()
        self.settings = read_settings(task)
        self.device = torch.device(task.options.device or "cpu")
        self.saves = {s.tensor_name: s for s in task.save_tasks}
        self.experts: List[ModelReference] = list(task.experts)
        self.ctx = ChainContext(experts=frozenset(self.experts))
        self.quiet = task.options.quiet
        self.universe = TaskUniverse()
        self.cached = {}
        if task.tokenizer_task is not None:
            handle = self.universe.add_task(task.tokenizer_task)
            self.cached[handle] = tokenizer_info
        self.out_tokenizer = getattr(tokenizer_info, "tokenizer", None)
        summary = parameter_summary(task)
        self.report = MergeReport([str(m) for m in self.experts], summary)
        self.expert_weight_summary = [
            summarize(s.tensor_task.input_parameters[m]["weight"] for s in task.save_tasks)
            for m in self.experts
        ]
        self.walk_bar = self.write_bar = None

    # ------------------------------------------------------------ tensors
    def gather(self, names) -> Dict[str, Dict[ModelReference, torch.Tensor]]:
        """Every input model's tensor for ``names``, via mergekit's loaders."""
        wanted = {}
        for n in names:
            handle = self.universe.add_task(self.saves[n].tensor_task.gather_tensors)
            wanted[handle] = n
        out = {}
        executor = Executor(list(wanted), math_device=self.device,
                            storage_device=self.device, cached_values=self.cached)
        with PHASES.phase("load"):
            for handle, value in executor._run(quiet=True):
                out[wanted[handle]] = value
        return out

    def finish(self, name: str, tensors) -> torch.Tensor:
        """Merge (via the mergekit task), write, and return the value as written."""
        save = self.saves[name]
        with PHASES.phase("write"):
            value = save.tensor_task.execute(tensors=tensors)
            if distributed.is_writer():
                save.execute(writer=self.writer, tensor=value)
        if self.write_bar is not None:
            self.write_bar.update(1)
        if save.dtype:
            value = value.to(dtype_from_name(save.dtype))
        return self._installed(value)

    def _installed(self, written: torch.Tensor) -> torch.Tensor:
        """What the running model uses: the tensor as written, in float32."""
        return written.to(device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self, key, report: Optional[dict] = None) -> None:
        records = self.writer.take()  # empty on ranks that do not write
        if self.checkpoints is not None and distributed.is_writer():
            self.checkpoints.save(key, records, report)

    def replay(self, key) -> Dict[str, torch.Tensor]:
        """Write a checkpointed step again; name -> value as finish() returned it."""
        out = {}
        records, self._replayed_report = self.checkpoints.load(key)
        for name, tensor, clone in records:
            if distributed.is_writer():
                self.writer.writer.save_tensor(name=name, tensor=tensor, clone=clone)
            if self.write_bar is not None:
                self.write_bar.update(1)
            out[name] = self._installed(tensor)
        return out

    # ------------------------------------------------------------ calibration
    def load_batches(self) -> Dict[ModelReference, List[Batch]]:
        s = self.settings
        template = resolve_chat_template(self.task)
        out = {}
        for index, model in enumerate(tqdm.tqdm(self.experts, desc="Loading calibration",
                                                unit="expert", disable=self.quiet)):
            # With tokenizer_source the embeddings are permuted to the output
            # vocabulary, so every expert's data must be tokenized with it.
            tok = self.out_tokenizer or model_tokenizer(model, self.task.options)
            if template:
                tok.chat_template = template  # `messages` rendered as the output will be
            with PHASES.phase("load"):
                # checked (and short files reported) when the merge was planned
                cal = load_calibration(s.calibration[model], tok, s.num_samples, s.max_seq_len,
                                       model=model, warn_short=False)
            LOG.info("%s: %d records, %d tokens from %s", model, cal.num_records, cal.num_tokens, cal.path)
            self.report.set_calibration(index, cal, self.expert_weight_summary[index])
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            # Under torchrun each rank calibrates on a disjoint share of the batches. Sharding
            # whole batches (not samples) keeps every batch's padding and Gram what one
            # process computes, so ranks change only the order of float64 sums.
            batches = make_batches(cal.sequences, s.batch_size, pad_id=pad)
            out[model] = distributed.shard(batches, f"expert {model}'s calibration (batch_size "
                                                    f"{s.batch_size})")
        return out

    # ------------------------------------------------------------ the walk
    def status(self, text: str) -> None:
        if self.walk_bar is not None:
            self.walk_bar.set_postfix_str(text, refresh=True)

    def run(self) -> None:
        distributed.setup(self.device)
        PHASES.reset(self.device)
        s = self.settings
        self.store = ActivationStore(self.device, resolve_dtype(s.activation_dtype, self.device),
                                     resolve_budget(s.activation_budget, self.device))
        try:
            self._run()
        finally:
            self.store.close()
        LOG.info("chain phases (s): %s", ", ".join(f"{k} {PHASES.seconds[k]:.2f}" for k in ORDER))

    def _run(self) -> None:
        layout = self.task.layout
        options = self.task.options
        config = load_out_config(self.task.out_config, self.task.config_source,
                                 options.trust_remote_code)
        shell = ModelShell(config, layout.first_layer_weight, self.device,
                           trust_remote_code=options.trust_remote_code)
        batches = self.load_batches()
        done = self.checkpoints.completed_layers() if self.checkpoints else 0
        # every rank must replay the same prefix (rank 0 writes the checkpoints)
        done = distributed.min_over_ranks(done, self.device)
        if done:
            LOG.info("resuming: layers 0-%d are taken from %s", done - 1, self.checkpoints.path)

        self.write_bar = tqdm.tqdm(total=len(self.saves), desc="Writing tensors", unit="tensor",
                                   disable=self.quiet)
        self.walk_bar = tqdm.tqdm(total=shell.num_layers, desc="Chain of Merges", unit="layer",
                                  disable=self.quiet)
        try:
            self.status("embeddings")
            pre = self.gather(layout.pre)  # the experts' own: needed on resume too
            if done:
                values = self.replay("pre")
            else:
                values = {name: self.finish(name, pre[name]) for name in layout.pre}
                self.checkpoint("pre")
            for name in layout.pre:
                shell.set_tensor(name, values[name])
            if getattr(config, "tie_word_embeddings", False):
                shell.tie_embeddings()
            own_pre = {m: self._own_params(pre, m) for m in self.experts}
            self._own_pre = own_pre

            merged_h, own_h, calls = {}, {}, {}
            for i, m in enumerate(self.experts):
                merged_h[m], own_h[m], calls[m] = (
                    CachedList(self.store, "merged", i), CachedList(self.store, "own", i), [])
                for ids, mask in batches[m]:
                    with PHASES.phase("forward"):
                        h, c = shell.embed(ids, mask)
                        merged_h[m].append(h)
                        h, _ = shell.embed(ids, mask, overrides=own_pre[m])
                        own_h[m].append(h)
                    calls[m].append(c)
            masks = {m: [mask.to(self.device).bool() for _, mask in batches[m]] for m in self.experts}
            self.caches = (merged_h, own_h, calls, masks)

            for index in range(shell.num_layers):
                if index < done:
                    self.replay_layer(shell, index, layout.layers[index])
                else:
                    self.merge_layer(shell, index, layout.layers[index])
                    self.checkpoint(index, self.report.layer_state(self._layer_key))
                self.walk_bar.update(1)
            shell.release()
            self.merge_head(shell, batches, getattr(config, "tie_word_embeddings", False))
            self.writer.take()  # the head is not checkpointed: a resume redoes it
        finally:
            self.walk_bar.close()
            self.write_bar.close()
        self.report.write(self.task.writer_task.out_path)

    def _record_shift(self, layer_key: str) -> None:
        """Covariate shift of the hidden states entering ``layer_key``, per expert."""
        merged_h, own_h, _calls, masks = self.caches
        for t, m in enumerate(self.experts):
            for b, valid in enumerate(masks[m]):
                self.report.add_shift(layer_key, t, merged_h[m][b][valid], own_h[m][b][valid])
        if distributed.active():
            self.report.sum_shift_over_ranks(layer_key, self.device)

    def _own_params(self, gathered, model, prefix: str = "") -> Dict[str, torch.Tensor]:
        return {
            n[len(prefix):]: t[model].to(device=self.device, dtype=torch.float32)
            for n, t in gathered.items()
            if model in t and t[model].is_floating_point()
        }

    def _accumulate(self, layer, groups, linears, params_for, inputs_for, stop_at, biased):
        """Mean Grams (and X^T Z for match_expert) per group of shared-input linears."""
        merged_h, own_h, calls, masks = self.caches
        match = self.settings.objective == "match_expert"
        targets = {g[0]: linears[g[0]] for g in groups}
        moments = {g[0]: {m: linalg.Moments() for m in self.experts} for g in groups}
        for m in self.experts:
            for b, valid in enumerate(masks[m]):
                call = calls[m][b][self._layer_index]
                with PHASES.phase("forward"):
                    xs = capture_inputs(layer, params_for(m), inputs_for(m)[b], call, targets, stop_at)
                    zs = (capture_inputs(layer, self._expert_params[m], own_h[m][b], call, targets,
                                         stop_at) if match else {})
                with PHASES.phase("gram"):
                    for key in targets:
                        x = self._rows(xs[key], valid, biased[key])
                        z = self._rows(zs[key], valid, biased[key]) if match else None
                        moments[key][m].add(x, z)
        distributed.all_reduce_moments(mo for per in moments.values() for mo in per.values())
        for key, per in moments.items():
            self._warn_if_rank_deficient(per, f"layer {self._layer_index} {key}")
        return {
            key: linalg.SharedInputStats(
                grams={m: mo.mean_gram() for m, mo in per.items()},
                crosses={m: mo.mean_cross() for m, mo in per.items()} if match else {},
            )
            for key, per in moments.items()
        }

    def _warn_if_rank_deficient(self, moments, where: str) -> None:
        for m, mo in moments.items():
            if mo.gram is None or m in self._warned_rank:
                continue
            width = mo.gram.shape[0]
            if mo.count < width:
                self._warned_rank.add(m)  # once per expert: later layers are alike
                LOG.warning(
                    "model %s: %d calibration tokens for %d input features (%s): the Gram is "
                    "rank-deficient and only the ridge regularises it; give more calibration "
                    "data for a better merge", m, mo.count, width, where,
                )

    @staticmethod
    def _rows(x: torch.Tensor, valid: torch.Tensor, biased: bool) -> torch.Tensor:
        x = x[valid].to(torch.float32)
        return linalg.with_ones_column(x) if biased else x

    def _solve_group(self, group, stats, linears, names_of, gathered, biased):
        """Solve every linear of one shared-input group; returns local name -> merged tensor.

        ``alpha``, ``ridge`` and each expert's ``weight`` are the values mergekit
        resolved for this weight tensor (filters, slices and gradients applied);
        a bias is solved with its weight, so it follows the weight's values.
        """
        installed = {}
        for key in group:
            weight_name, bias_name = names_of[key]
            task = self.saves[weight_name].tensor_task
            params = task.parameters
            weights = [task.input_parameters[m]["weight"] for m in self.experts]
            transposed = is_transposed(linears[key])
            targets = []
            for m in self.experts:
                w = gathered[weight_name][m].to(self.device, torch.float64)
                w = w.T if transposed else w
                if biased[group[0]]:
                    b = (gathered[bias_name][m].to(self.device, torch.float64) if bias_name
                         else w.new_zeros(w.shape[0]))
                    w = torch.cat([w, b[:, None]], dim=1)
                targets.append(w)
            with PHASES.phase("solve"):
                merged = linalg.solve_linear(
                    stats, self.experts, weights, targets,
                    alpha=params["alpha"], ridge=params["ridge"],
                    objective=self.settings.objective, name=weight_name,
                )
            if biased[group[0]]:
                merged, bias = merged[:, :-1], merged[:, -1]
                if bias_name:
                    self.ctx.solutions[bias_name] = bias.to(torch.float32)
            self.ctx.solutions[weight_name] = (merged.T if transposed else merged).to(torch.float32)
            for n in (weight_name, bias_name):
                if n:
                    installed[n] = self.finish(n, gathered[n])
            self._record_residual(key, stats, targets, installed, weight_name, bias_name,
                                  transposed, biased[group[0]])
        return installed

    def _record_residual(self, key, stats, targets, installed, weight_name, bias_name,
                         transposed, biased) -> None:
        """Residual of the weights as written (rounded to the output dtype)."""
        written = installed[weight_name].to(torch.float64)
        written = written.T if transposed else written
        if biased:
            bias = (installed[bias_name].to(torch.float64) if bias_name
                    else written.new_zeros(written.shape[0]))
            written = torch.cat([written, bias[:, None]], dim=1)
        for t, m in enumerate(self.experts):
            self.report.add_residual(self._layer_key, key, t, stats.grams[m], targets[t], written)

    def merge_layer(self, shell: ModelShell, index: int, names) -> Dict[str, torch.Tensor]:
        """Merge one decoder layer; returns its merged parameters (local names)."""
        self._layer_index = index
        merged_h, own_h, calls, masks = self.caches
        prefix = shell.layer_prefix(index)
        self._layer_key = prefix[:-1]
        self._record_shift(self._layer_key)
        self.status(f"{self._layer_key}: loading")
        gathered = self.gather(names)
        layer = shell.layer(index)
        linears = {k: v for k, v in shell.linear_modules(index).items() if f"{prefix}{k}.weight" in gathered}
        names_of = {
            k: (f"{prefix}{k}.weight", f"{prefix}{k}.bias" if f"{prefix}{k}.bias" in gathered else None)
            for k in linears
        }
        linear_names = {n for pair in names_of.values() for n in pair if n}
        # (every layer parameter is planned: checked at planning, support.check_coverage)
        self._expert_params = {m: self._own_params(gathered, m, prefix) for m in self.experts}

        try:
            merged = {
                n[len(prefix):]: self.finish(n, gathered[n]) for n in names if n not in linear_names
            }
            # Not-yet-merged linears never influence an earlier linear's input;
            # expert 0's weights just make the module callable.
            current = dict(self._expert_params[self.experts[0]])
            current.update(merged)
            first = self.experts[0]
            h0 = merged_h[first][0]
            groups = linear_call_groups(layer, current, h0, calls[first][0][index], linears)
            biased = {g[0]: any(names_of[k][1] for k in g) for g in groups}
            chain = self.settings.chain
            if chain == "module":
                for group in groups:
                    self.status(f"{self._layer_key}: {'+'.join(group)}")
                    stats = self._accumulate(
                        layer, [group], linears, lambda m: current, lambda m: merged_h[m],
                        stop_at=group[0], biased=biased,
                    )[group[0]]
                    done = self._solve_group(group, stats, linears, names_of, gathered, biased)
                    current.update({n[len(prefix):]: v for n, v in done.items()})
            else:
                source = merged_h if chain == "block" else own_h
                self.status(f"{self._layer_key}: {len(groups)} linear groups")
                stats = self._accumulate(
                    layer, groups, linears, lambda m: self._expert_params[m], lambda m: source[m],
                    stop_at=groups[-1][0], biased=biased,
                )
                for group in groups:
                    done = self._solve_group(group, stats[group[0]], linears, names_of, gathered, biased)
                    current.update({n[len(prefix):]: v for n, v in done.items()})
        finally:
            self.ctx.solutions.clear()
        self._advance(layer, index, current)
        del gathered, self._expert_params
        return current

    def replay_layer(self, shell: ModelShell, index: int, names) -> None:
        """A checkpointed layer: write it again, restore its report entries, and
        push both activation streams through it."""
        prefix = shell.layer_prefix(index)
        self._layer_key = prefix[:-1]
        self.status(f"{self._layer_key}: from the checkpoint")
        layer = shell.layer(index)
        current = {n[len(prefix):]: v for n, v in self.replay(index).items()}
        self.report.restore_layer(self._layer_key, self._replayed_report)
        gathered = self.gather(names)
        self._expert_params = {m: self._own_params(gathered, m, prefix) for m in self.experts}
        self._advance(layer, index, current)
        self._expert_params = None

    def _advance(self, layer, index: int, current: Dict[str, torch.Tensor]) -> None:
        """Cached activations one layer forward: merged layer and experts' own."""
        merged_h, own_h, calls, masks = self.caches
        with PHASES.phase("forward"):
            for m in self.experts:
                for b in range(len(masks[m])):
                    call = calls[m][b][index]
                    merged_h[m][b] = run_layer(layer, current, merged_h[m][b], call)
                    own_h[m][b] = run_layer(layer, self._expert_params[m], own_h[m][b], call)
        # Unmap this layer's weight files: mmapped pages would otherwise stay resident
        # and make memory grow with depth (they are re-opened for the next layer).
        LoaderCache().flush_all()

    def merge_head(self, shell: ModelShell, batches, config_tied: bool) -> None:
        """Final norm(s) by the fallback rule; an untied lm_head by the solve."""
        from mergekit_com.walker import LINEAR_TYPES

        merged_h, own_h, calls, masks = self.caches
        post = self.task.layout.post
        self._layer_key = HEAD
        self._record_shift(HEAD)
        self.status(HEAD)
        gathered = self.gather(post)
        heads = [
            n for n in post
            if n.endswith(".weight") and not config_tied
            and isinstance(shell.model.get_submodule(n.rpartition(".")[0]), LINEAR_TYPES)
        ]
        try:
            for n in post:
                if n not in heads and not (n.endswith(".bias") and n[:-5] + ".weight" in heads):
                    shell.set_tensor(n, self.finish(n, gathered[n]))
            # all non-layer tensors: an inferred architecture may list the final norm as "pre"
            own_post = {m: {**self._own_pre[m], **self._own_params(gathered, m)} for m in self.experts}
            for weight_name in heads:
                module_name = weight_name.rpartition(".")[0]
                head = shell.model.get_submodule(module_name)
                bias_name = f"{module_name}.bias" if f"{module_name}.bias" in gathered else None
                key = module_name
                match = self.settings.objective == "match_expert"
                moments = {m: linalg.Moments() for m in self.experts}
                for m in self.experts:
                    ids_masks = batches[m]
                    for b, valid in enumerate(masks[m]):
                        ids, mask = ids_masks[b]
                        chain = self.settings.chain
                        hidden = merged_h[m][b] if chain != "none" else own_h[m][b]
                        overrides = None if chain == "module" else own_post[m]
                        with PHASES.phase("forward"):
                            x = shell.head_inputs(hidden, ids, mask, head, overrides)
                            z = (shell.head_inputs(own_h[m][b], ids, mask, head, own_post[m])
                                 if match else None)
                        with PHASES.phase("gram"):
                            moments[m].add(self._rows(x, valid, bool(bias_name)),
                                           self._rows(z, valid, bool(bias_name)) if match else None)
                distributed.all_reduce_moments(moments.values())
                self._warn_if_rank_deficient(moments, module_name)
                stats = linalg.SharedInputStats(
                    grams={m: mo.mean_gram() for m, mo in moments.items()},
                    crosses={m: mo.mean_cross() for m, mo in moments.items()} if match else {},
                )
                self._solve_group([key], stats, {key: head},
                                  {key: (weight_name, bias_name)}, gathered, {key: bool(bias_name)})
        finally:
            self.ctx.solutions.clear()


def run_chain(task, writer, tokenizer_info=None) -> None:
    """Walk, write every tensor, and leave ``com_report.json`` in the output folder."""
    walk = _Walk(task, writer, tokenizer_info)
    token = activate(walk.ctx)
    try:
        walk.run()
    finally:
        deactivate(token)
