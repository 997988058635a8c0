"""The benchmark's reference chain: for every layer, re-run the whole merged
prefix from the embeddings instead of pushing a cache one layer forward.

Same merged weights as the real walk (the inputs each layer sees are the
same), but quadratic in depth. It exists only to show what the cache saves;
nothing outside the benchmark uses it.
"""

from __future__ import annotations

from mergekit_com import engine
from mergekit_com.timing import PHASES
from mergekit_com.walker import run_layer


class NaivePrefixWalk(engine._Walk):
    def merge_layer(self, shell, index, names):
        merged_h, _own_h, calls, masks = self.caches
        if index == 0:
            self._embedded = {m: [merged_h[m][b] for b in range(len(masks[m]))] for m in self.experts}
            self._done = []
        else:
            layer = shell.layer(index)  # same block class at every depth: reuse the module
            with PHASES.phase("forward"):
                for m in self.experts:
                    for b in range(len(masks[m])):
                        h = self._embedded[m][b]
                        for j, params in enumerate(self._done):
                            h = run_layer(layer, params, h, calls[m][b][j])
                        merged_h[m][b] = h
        self._done.append(super().merge_layer(shell, index, names))


def install() -> None:
    engine._Walk = NaivePrefixWalk
