"""The walk's blocked products against the one product each replaces:
``python -m mergekit_com.bench kernels``.

* ``gram``: a batch's ``X^T X`` as ``linalg.upper_gram`` forms it (the blocks on and above
  the diagonal, then ``symmetric`` completes it), against one GEMM;
* ``spread``: ``alpha: auto``'s per-sequence ``||X_s X_s^T||^2`` as
  ``linalg.product_sq_norms`` forms them (the row blocks on and above each diagonal),
  against one batched product.

Per shape (pico's and SmolLM2's widths, 256-token sequences, a batch of 2048 tokens) and
thread count: both are checked to give the same values, then each keeps the fastest of its
repeats, the two alternating so that a drift of the machine's speed reaches both.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..method import linalg

GRAM_SHAPES = ((2048, 512), (2048, 576), (2048, 1536))  # rows, width
SPREAD_SHAPES = ((8, 256, 512), (8, 256, 576), (8, 256, 1536))  # sequences, tokens, width


def _kernels(kind: str, shape: Tuple[int, ...], generator: torch.Generator):
    """(ours, the plain product), each a function returning what it computes."""
    x = torch.randn(*shape, generator=generator)
    if kind == "gram":
        return (lambda: linalg.symmetric(linalg.upper_gram(x)), lambda: x.T @ x)
    return (lambda: linalg.product_sq_norms(x),
            lambda: torch.linalg.vector_norm(torch.bmm(x, x.transpose(1, 2)).flatten(1), dim=1,
                                             dtype=torch.float64).square())


def _fastest_pair(ours: Callable, plain: Callable, repeats: int) -> Tuple[float, float]:
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, plain)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def run(threads: Sequence[int] = (1, 2), repeats: int = 20,
        shapes: Optional[Dict[str, Sequence[Tuple[int, ...]]]] = None) -> dict:
    """A row per kernel, shape and thread count (``shapes``: by kernel, default pico's and
    SmolLM2's); raises AssertionError where a blocked product differs from the plain one."""
    shapes = shapes or {"gram": GRAM_SHAPES, "spread": SPREAD_SHAPES}
    before = torch.get_num_threads()
    rows: List[dict] = []
    try:
        for kind, kind_shapes in shapes.items():
            for shape in kind_shapes:
                ours, plain = _kernels(kind, shape, torch.Generator().manual_seed(0))
                # float32 products summed in another order: the same values to float32's precision
                torch.testing.assert_close(ours().double(), plain().double(), rtol=1e-4, atol=1e-3)
                for t in threads:
                    torch.set_num_threads(t)
                    ours(), plain()  # warm-up
                    ours_s, plain_s = _fastest_pair(ours, plain, repeats)
                    rows.append({"kernel": kind, "shape": list(shape), "threads": t,
                                 "ours_ms": 1e3 * ours_s, "plain_ms": 1e3 * plain_s,
                                 "speedup": plain_s / ours_s})
    finally:
        torch.set_num_threads(before)
    return {"rows": rows, "repeats": repeats}


def table(result: dict) -> str:
    lines = ["| kernel | shape | threads | blocked ms | one product ms | speed-up |", "|---" * 6 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['kernel']} | {' x '.join(map(str, r['shape']))} | {r['threads']} "
                     f"| {r['ours_ms']:.2f} | {r['plain_ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)
