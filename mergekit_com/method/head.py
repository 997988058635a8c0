"""The tensors after the decoder layers: final norm(s) by the fallback rule, then an
untied ``lm_head`` solved like any linear, on the inputs the chain says."""

from __future__ import annotations

from typing import Dict, Hashable, List, Sequence

import torch

from mergekit_com.method.context import WalkContext
from mergekit_com.method.layer import solve_group
from mergekit_com.method.timing import PHASES
from mergekit_com.model.stepping import LINEAR_TYPES

HEAD = "head"  # the report's name for this step


def merge_head(ctx: WalkContext, names: Sequence[str], tied: bool,
               own_pre: Dict[Hashable, Dict[str, torch.Tensor]]) -> None:
    shell, streams = ctx.shell, ctx.streams
    ctx.record_shift(HEAD)
    ctx.progress.status(HEAD)
    gathered = ctx.io.read(names)
    heads: List[str] = [
        n for n in names
        if n.endswith(".weight") and not tied
        and isinstance(shell.model.get_submodule(n.rpartition(".")[0]), LINEAR_TYPES)
    ]
    for n in names:
        if n not in heads and not (n.endswith(".bias") and n[:-5] + ".weight" in heads):
            shell.set_tensor(n, ctx.installed(ctx.io.write_fallback(n, gathered[n])))
    # every non-layer tensor: an inferred architecture may list the final norm as "pre"
    own_post = {e: {**own_pre[e], **ctx.own_params(gathered, e)} for e in ctx.experts}
    cross = ctx.objective.needs_expert_inputs
    for weight_name in heads:
        module_name = weight_name.rpartition(".")[0]
        head = shell.model.get_submodule(module_name)
        bias_name = f"{module_name}.bias" if f"{module_name}.bias" in gathered else None
        stats = ctx.group_statistics([weight_name], biased=bool(bias_name))
        for e in ctx.experts:
            # the final norm: the merged one under chain: module, else the expert's own
            overrides = None if ctx.chain.inside == "merged" else own_post[e]
            source = streams.stream(ctx.chain.stream)[e]
            for b, (ids, mask) in enumerate(streams.batches[e]):
                with PHASES.phase("forward"):
                    x = shell.head_inputs(source[b], ids, mask, head, overrides)
                    z = (shell.head_inputs(streams.own[e][b], ids, mask, head, own_post[e])
                         if cross else None)
                with PHASES.phase("gram"):
                    stats.add(e, x, streams.tokens[e][b], z)
        solve_group(ctx, HEAD, [module_name], stats.finish(module_name, ctx.warned),
                    {module_name: head}, {module_name: (weight_name, bias_name)}, gathered,
                    biased=bool(bias_name))
