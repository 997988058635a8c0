"""The benchmark's reference chain: for every layer, re-run the whole merged
prefix from the embeddings instead of pushing a cache one layer forward.

Same merged weights as the real walk (the inputs each layer sees are the
same), but quadratic in depth. It exists only to show what the cache saves;
nothing outside the benchmark uses it. It plugs into the walk's public
extension points (``before_layer``/``after_layer``) and into
``chain_task.walk_class``.
"""

from __future__ import annotations

from mergekit_com.integration import chain_task
from mergekit_com.method.timing import PHASES
from mergekit_com.method.walk import ChainWalk
from mergekit_com.model.stepping import run_layer


class NaivePrefixWalk(ChainWalk):
    def before_layer(self, ctx, index):
        streams = ctx.streams
        if index == 0:
            self._embedded = {e: [streams.merged[e][b] for b in range(streams.merged_count[e])]
                              for e in ctx.experts}
            self._done = []
            return
        with PHASES.phase("forward"):
            for e in ctx.experts:
                for b, h in enumerate(self._embedded[e]):
                    for j, params in enumerate(self._done):
                        h = run_layer(ctx.shell.instantiate(j, params), h, streams.call(e, b, j))
                    streams.merged[e][b] = h

    def after_layer(self, ctx, index, written):
        prefix = ctx.shell.layer_prefix(index)
        self._done.append({name[len(prefix):]: ctx.installed(t) for name, t in written})


def install() -> None:
    chain_task.walk_class = NaivePrefixWalk
