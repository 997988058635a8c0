"""One decoder layer's merge, given the merged layers before it.

  1. Read the K experts' tensors of the layer.
  2. Merge its other tensors (norms, ...) by the fallback rule.
  3. Find its linears in call order, grouped by shared input (q/k/v, o,
     gate/up, down for Llama); one the forward never calls follows the fallback rule.
  4. For each group: accumulate every expert's statistics on the inputs the
     chain says (``X_t``; ``Z_t`` too for ``match_expert`` and ``blend``, and
     where the group has no more outputs than inputs, its linears' outputs
     ``Y_t`` in the expert's own layer), solve each of its linears, write them
     and install them in the merged layer.
  5. Push the streams through the merged layer (and each expert's own).
Each batch runs through the layer once: its pass pauses at every group's
input while the group is solved (``model/passes.py``).
"""

from __future__ import annotations

import logging
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mergekit_com.method.context import WalkContext
from mergekit_com.method.parameters import AUTO
from mergekit_com.method.ports import Gathered, Written
from mergekit_com.method.timing import PHASES
from mergekit_com.model.passes import LayerPass, PausableLayer
from mergekit_com.model.stepping import (
    is_transposed,
    linear_call_groups,
    run_layer,
    set_parameter,
)

LOG = logging.getLogger("mergekit.chain_of_merges.layer")  # under mergekit's logger
Names = Tuple[str, Optional[str]]  # (weight name, bias name or None)


def input_width(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def output_width(module: nn.Module) -> int:
    return module.weight.shape[1] if is_transposed(module) else module.weight.shape[0]


def solve_group(ctx: WalkContext, layer_key: str, group: Sequence[str],
                stats, modules: Dict[str, nn.Module], names_of: Dict[str, Names],
                gathered: Gathered, biased: bool) -> Dict[str, torch.Tensor]:
    """Solve, write and report every linear of one shared-input group.

    Returns name -> tensor as written (output dtype). A bias is
    solved with its weight, as a column on a constant input, so it follows
    the weight's ``alpha``, ``ridge`` and expert weights.
    """
    written: Dict[str, torch.Tensor] = {}
    for key in group:
        weight_name, bias_name = names_of[key]
        settings = ctx.io.solve_settings(weight_name)
        transposed = is_transposed(modules[key])
        targets = [_augmented(gathered[weight_name][e], gathered[bias_name][e] if bias_name else None,
                              transposed, biased, ctx.device)
                   for e in ctx.experts]
        with PHASES.phase("solve"):
            merged, target_norms = ctx.objective.solve(stats, ctx.experts, targets, settings,
                                                       weight_name)
        if settings.alpha == AUTO and ctx.objective.uses_alpha:  # match_expert ignores alpha
            ctx.report.add_alpha(layer_key, key, stats.alphas(ctx.experts, AUTO))
        if ctx.objective.share(settings) == AUTO:
            ctx.report.add_blend(layer_key, key, stats.last_blend)
        solutions = {}
        if biased:
            merged, bias = merged[:, :-1], merged[:, -1]
        solutions[weight_name] = (merged.T if transposed else merged).to(ctx.dtype)
        if biased and bias_name:
            solutions[bias_name] = bias.to(ctx.dtype)
        for name, value in solutions.items():
            written[name] = ctx.io.write_solved(name, value, gathered[name])
        as_written = _augmented(written[weight_name], written.get(bias_name), transposed, biased,
                                ctx.device)
        with PHASES.phase("report"):
            for t, e in enumerate(ctx.experts):
                ctx.report.add_residual(layer_key, key, t, stats.grams[e], targets[t], as_written,
                                        None if target_norms is None else target_norms[t])
    return written


def _augmented(weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool,
               biased: bool, device) -> torch.Tensor:
    """``[out, in]`` in float64, with the bias (or zeros) as a last column when ``biased``."""
    w = weight.to(device, torch.float64)
    w = w.T if transposed else w
    if biased:
        b = bias.to(device, torch.float64) if bias is not None else w.new_zeros(w.shape[0])
        w = torch.cat([w, b[:, None]], dim=1)
    return w


def _bias_runs(group: List[str], names_of: Dict[str, Names]) -> List[List[str]]:
    """A shared-input group cut into runs of consecutive linears that all have a bias, or
    all have none: a bias is solved as a column on a constant input, which a linear
    without one must not be fitted with (each run's statistics are its own)."""
    runs: List[List[str]] = []
    for key in group:
        if runs and (names_of[key][1] is None) == (names_of[runs[-1][0]][1] is None):
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


class LayerMerge:
    def __init__(self, ctx: WalkContext, index: int, names: Sequence[str]):
        self.ctx, self.index, self.names = ctx, index, list(names)
        self.prefix = ctx.shell.layer_prefix(index)
        self.key = self.prefix[:-1]

    # ------------------------------------------------------------ entry points
    def merge(self) -> Written:
        """Steps 1-5; returns what was written, for the checkpoint."""
        ctx, prefix = self.ctx, self.prefix
        ctx.record_shift(self.key)
        ctx.progress.status(f"{self.key}: loading")
        gathered = ctx.io.read(self.names)  # 1
        linears = [k for k in ctx.shell.linear_names(self.index) if f"{prefix}{k}.weight" in gathered]
        names_of = {k: (f"{prefix}{k}.weight",
                        f"{prefix}{k}.bias" if f"{prefix}{k}.bias" in gathered else None)
                    for k in linears}
        solved = {n for pair in names_of.values() for n in pair if n}
        written: Written = []
        current = dict(ctx.own_params(gathered, ctx.experts[0], prefix))
        for name in self.names:  # 2
            if name not in solved:
                value = ctx.io.write_fallback(name, gathered[name])
                current[name[len(prefix):]] = ctx.installed(value)
                written.append((name, value))
        # Not-yet-merged linears never influence an earlier linear's input:
        # expert 0's weights just make the module callable.
        merged_layer = ctx.shell.instantiate(self.index, current)
        runs_own = ctx.chain.inside == "own" or ctx.objective.needs_expert_inputs
        own_layers = self._own_layers(gathered, runs_own or self._own_stream_kept())
        # 3; the probe enters every layer with the embeddings: only the code path matters
        probe_hidden, probe_calls = ctx.streams.probe
        groups = [run for g in linear_call_groups(merged_layer, probe_hidden, probe_calls[self.index],
                                                  linears)
                  for run in _bias_runs(g, names_of)]
        written += self._unmeasured(merged_layer, groups, linears, names_of, gathered)
        stops = {g[0]: g[0] for g in groups}
        by_outputs = {g[0] for g in groups if self._targets_by_outputs(merged_layer, g)}
        captured = [k for g in groups if g[0] in by_outputs for k in g]
        layers = [PausableLayer(merged_layer, stops)]
        layers += [PausableLayer(m, stops, captured) for m in own_layers.values()]
        passes = self._passes(layers[0], dict(zip(own_layers, layers[1:])),
                              [merged_layer.get_submodule(g[0]) for g in groups])
        try:
            modules = {k: merged_layer.get_submodule(k) for k in linears}
            for group in groups:  # 4
                ctx.progress.status(f"{self.key}: {'+'.join(group)}")
                biased = any(names_of[k][1] for k in group)
                stats = self._statistics(group, *passes, biased, names_of, group[0] in by_outputs)
                done = solve_group(ctx, self.key, group, stats, modules,
                                   {k: names_of[k] for k in group}, gathered, biased)
                for name, value in done.items():
                    set_parameter(merged_layer, name[len(prefix):], ctx.installed(value))
                    written.append((name, value))
            self._advance(merged_layer, own_layers, *passes)  # 5
        finally:
            for run in (p for per in passes for runs in per.values() for p in runs):
                run.close()
            for layer in layers:
                layer.close()
        return written

    def replay(self, written: Written) -> None:
        """A checkpointed layer: its tensors are written already; push the streams through it."""
        ctx = self.ctx
        ctx.progress.status(f"{self.key}: from the checkpoint")
        current = {name[len(self.prefix):]: ctx.installed(t) for name, t in written}
        needed = self._own_stream_kept()
        own_layers = self._own_layers(ctx.io.read(self.names), needed) if needed else {}
        self._advance(ctx.shell.instantiate(self.index, current), own_layers, None, None)

    # ------------------------------------------------------------ steps
    def _unmeasured(self, merged_layer: nn.Module, groups: List[List[str]], linears: List[str],
                    names_of: Dict[str, Names], gathered: Gathered) -> Written:
        """Linears the layer's forward never called on the probe have no inputs to measure:
        they follow the fallback rule, with a warning naming them."""
        called = {k for g in groups for k in g}
        missed = [k for k in linears if k not in called]
        if missed:
            LOG.warning("%s: the forward never calls %s (on a probe of the calibration's first "
                        "tokens), so %s no inputs to fit; merged by the fallback rule instead",
                        self.key, ", ".join(missed), "it has" if len(missed) == 1 else "they have")
        written: Written = []
        for name in (n for k in missed for n in names_of[k] if n):
            value = self.ctx.io.write_fallback(name, gathered[name])
            set_parameter(merged_layer, name[len(self.prefix):], self.ctx.installed(value))
            written.append((name, value))
        return written

    def _own_stream_kept(self) -> bool:
        streams = self.ctx.streams
        return streams.sample is not None or any(streams.own_count.values())

    def _own_layers(self, gathered: Gathered, needed: bool) -> Dict[Hashable, nn.Module]:
        """Each expert's own layer, where a chain, objective or own stream runs it."""
        if not needed:
            return {}
        return {e: self.ctx.shell.instantiate(self.index, self.ctx.own_params(gathered, e, self.prefix))
                for e in self.ctx.experts}

    def _passes(self, merged: PausableLayer, own: Dict[Hashable, PausableLayer],
                stop_modules: List[nn.Module]):
        """Per expert and batch: the pass giving ``X_t`` and, for match_expert and blend, ``Z_t``."""
        ctx, streams = self.ctx, self.ctx.streams
        chain = ctx.chain
        budget = streams.store.free_bytes if ctx.pass_budget is None else ctx.pass_budget
        # a paused pass holds about its group inputs and two copies of the residual stream
        per_token = (sum(input_width(m) for m in stop_modules)
                     + 2 * input_width(stop_modules[0])) * ctx.dtype.itemsize
        x_passes: Dict[Hashable, List[LayerPass]] = {}
        z_passes: Dict[Hashable, List[LayerPass]] = {}
        for e in ctx.experts:
            layer = merged if chain.inside == "merged" else own[e]
            x_passes[e], z_passes[e] = [], []
            for b in range(streams.count(chain.stream, e)):
                call = streams.call(e, b, self.index)
                cost = streams.masks[e][b].numel() * per_token
                keep, budget = budget >= cost, budget - cost
                x_passes[e].append(LayerPass(layer, streams.loader(chain.stream, e, b), call, keep))
                if ctx.objective.needs_expert_inputs:
                    if chain.stream == "own" and chain.inside == "own":
                        z_passes[e].append(x_passes[e][-1])  # RegMean's X is the expert's own Z
                    else:
                        keep, budget = budget >= cost, budget - cost
                        z_passes[e].append(LayerPass(own[e], streams.loader("own", e, b), call, keep))
        return x_passes, z_passes

    def _targets_by_outputs(self, layer: nn.Module, group: Sequence[str]) -> bool:
        """Whether the group's targets' moments are each linear's ``X^T Y`` rather than
        ``X^T Z``: where its linears have no more outputs in all than inputs (Llama's
        ``o_proj`` and ``down_proj``), that product is no larger, the expert's own pass
        computes ``Y`` anyway, and the solve needs no ``in x in x out`` product of ``C``."""
        if not self.ctx.objective.needs_expert_inputs:
            return False
        modules = [layer.get_submodule(k) for k in group]
        return sum(output_width(m) for m in modules) <= input_width(modules[0])

    def _statistics(self, group: Sequence[str], x_passes, z_passes, biased: bool, names_of,
                    by_outputs: bool):
        ctx = self.ctx
        key = group[0]
        cross = ctx.objective.needs_expert_inputs
        stats = ctx.group_statistics([names_of[k][0] for k in group], biased, by_outputs)
        for e in ctx.experts:
            for b, x_pass in enumerate(x_passes[e]):
                z_pass = z_passes[e][b] if cross else None
                ys = None
                with PHASES.phase("forward"):
                    if by_outputs:  # the expert's own pass runs on through the group
                        z, outputs = z_pass.input_and_outputs(
                            key, group, stats.output_rows(ctx.streams.tokens[e][b]))
                        ys = {names_of[k][0]: y for k, y in outputs.items()}
                        x = z if z_pass is x_pass else x_pass.input_of(key)
                    else:
                        x = x_pass.input_of(key)
                        z = (x if z_pass is x_pass else z_pass.input_of(key)) if cross else None
                with PHASES.phase("gram"):
                    stats.add(e, x, ctx.streams.tokens[e][b], z, ys)
        with PHASES.phase("gram"):  # the sums over ranks and folds, and the means
            return stats.finish(f"layer {self.index} {key}", ctx.warned)

    def _advance(self, merged_layer: nn.Module, own_layers: Dict[Hashable, nn.Module],
                 x_passes, z_passes) -> None:
        """Step 5: the hidden states entering the next layer, in every stream kept."""
        ctx, streams = self.ctx, self.ctx.streams
        chain = ctx.chain
        with PHASES.phase("forward"):
            for e in ctx.experts:
                for b in range(streams.merged_count[e]):
                    if x_passes is not None and chain.inside == "merged":
                        out = x_passes[e][b].output()  # the merged layer's own pass, resumed
                    else:
                        out = run_layer(merged_layer, streams.merged[e][b], streams.call(e, b, self.index))
                    streams.merged[e][b] = out
                for b in range(streams.own_count[e]):
                    if x_passes is not None and chain.stream == "own":
                        out = x_passes[e][b].output()
                    elif z_passes is not None and z_passes[e]:
                        out = z_passes[e][b].output()
                    else:
                        out = run_layer(own_layers[e], streams.own[e][b], streams.call(e, b, self.index))
                    streams.own[e][b] = out
                if streams.sample is not None:  # the covariate shift's sample, in both models
                    call = streams.sample_calls[e][self.index]
                    streams.sample_merged[e][0] = run_layer(merged_layer, streams.sample_merged[e][0], call)
                    streams.sample_own[e][0] = run_layer(own_layers[e], streams.sample_own[e][0], call)
        # Unmap this layer's weight files: mapped pages would otherwise stay resident
        # and make memory grow with depth (they are re-opened for the next layer).
        ctx.io.end_layer()
