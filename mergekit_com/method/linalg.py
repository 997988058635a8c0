"""The closed-form math of RegMean / Chain of Merges, free of mergekit and HF.

Orientation: activations are rows, ``X`` is ``[n, in]``; HF ``Linear.weight``
is ``[out, in]``, so the regression solves for ``V = W^T`` (``[in, out]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch

from mergekit_com.method.parameters import AUTO

LOG = logging.getLogger("mergekit.chain_of_merges.linalg")  # under mergekit's logger

Alpha = Union[float, str]  # a keep ratio, or AUTO: estimated from the data (shrinkage_alpha)


def offdiag_sq(m: torch.Tensor) -> float:
    """Sum of the squared off-diagonal entries of a square matrix."""
    total = torch.linalg.vector_norm(m, dtype=torch.float64).square()
    return float(total - torch.linalg.vector_norm(m.diagonal(), dtype=torch.float64).square())


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. A NaN or Inf anywhere makes the sum NaN or
    Inf, so one sum (30x faster than ``isfinite(t).all()`` on this CPU, and as fast on
    two threads as on one) settles it, unless finite entries overflowed it: then the
    entries are tested one by one."""
    wide = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return bool(torch.isfinite(t.sum(dtype=wide))) or bool(torch.isfinite(t).all())


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>``: the products and each column's sum in the tensors' dtype (for float32, the
    precision the products themselves carry), the column sums added in float64. 3-4x
    faster on this CPU than one float64 sum of float32 products, which converts every
    product."""
    return float((a * b).sum(0).double().sum())


def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``diag(A^T B)``: each column's dot product, summed in the tensors' dtype, like a
    Gram formed in it (a float64 sum of float32 products is 2.5-4x slower)."""
    return (a * b).sum(0)


GRAM_BLOCK = 128  # columns per block of the upper-triangle Gram (at most 8 blocks)


def gram_blocks(width: int) -> int:
    """How many column blocks ``upper_gram`` splits a ``width``-wide input into."""
    return max(1, min(8, width // GRAM_BLOCK))


def _block_step(width: int) -> int:
    return -(-width // gram_blocks(width))


def upper_gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` where only the blocks on and above the diagonal are computed.

    The lower blocks are left zero: with b blocks, ``(b + 1) / 2b`` of a full
    product's work (1.3-1.6x faster than one GEMM at widths 512-1536 on 1 and 2 CPU
    threads: ``python -m mergekit_com.bench kernels``). ``symmetric`` completes it.
    """
    width = x.shape[1]
    if gram_blocks(width) == 1:
        return x.T @ x
    return add_upper_gram(x.new_zeros(width, width), x)


def add_upper_gram(total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``total += upper_gram(x)``, each block product added where it goes: no zero lower
    blocks are formed or added (a float64 ``total`` takes float32 products exactly)."""
    width = x.shape[1]
    if gram_blocks(width) == 1:
        return total.add_(x.T @ x)
    step = _block_step(width)
    for i in range(0, width, step):
        total[i:i + step, i:].add_(x[:, i:i + step].T @ x[:, i:])
    return total


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """Complete, in place, a Gram whose upper block triangle ``upper_gram`` (or a sum of
    its outputs) holds: each lower block is its mirror's transpose. Block by block,
    because one whole transposed copy is cache-hostile (7x slower at width 1536)."""
    width = upper.shape[0]
    step = _block_step(width)
    for i in range(0, width, step):
        for j in range(i + step, width, step):
            upper[j:j + step, i:i + step].copy_(upper[i:i + step, j:j + step].T)
    return upper


def _symmetric_inner(upper: torch.Tensor, other: torch.Tensor, inner) -> torch.Tensor:
    """``<S, other>`` for the symmetric ``S`` whose upper block triangle ``upper`` holds
    (lower blocks zero) and a symmetric ``other``: the stored blocks count twice, less the
    diagonal blocks once. ``inner(a, b)``: the inner product of two equal-shaped blocks."""
    step = _block_step(upper.shape[0])
    total = 2 * inner(upper, other)
    for i in range(0, upper.shape[0], step):
        block = (slice(i, i + step), slice(i, i + step))
        total = total - inner(upper[block], other[block])
    return total


SPREAD_BLOCK_ROWS = 32  # rows per row block of product_sq_norms (at most 8 blocks) ...
SPREAD_BLOCKED_FROM = 1 << 15  # ... for matrices of this many entries or more: below, one
# product was as fast or faster (0.01-0.04 ms per call on the tiny zoo's shapes)


def product_sq_norms(y: torch.Tensor) -> torch.Tensor:
    """``||Y_i Y_i^T||_F^2`` (float64) of each ``[m, k]`` matrix of a ``[count, m, k]``
    stack, from the row blocks of each product on and above its diagonal (an
    off-diagonal block counts twice): with b blocks, ``(b + 1) / 2b`` of the product's
    work. Blocks of ``SPREAD_BLOCK_ROWS`` rows or more, at most 8: 1.36-1.47x faster than
    the whole batched product for 8 sequences of 256 tokens at pico's and SmolLM2's widths,
    on 1 and 2 threads (``python -m mergekit_com.bench kernels``, ``docs/scaling.md``)."""
    count, m, k = y.shape
    blocks = 1 if m * k < SPREAD_BLOCKED_FROM else max(1, min(8, m // SPREAD_BLOCK_ROWS))
    step = -(-m // blocks)
    total = torch.zeros(count, dtype=torch.float64, device=y.device)
    for i in range(0, m, step):
        rows = torch.bmm(y[:, i:i + step], y[:, i:].transpose(1, 2))  # [count, step, m - i]
        total += torch.linalg.vector_norm(rows[:, :, :step], dim=(1, 2), dtype=torch.float64).square()
        if i + step < m:
            total += 2 * torch.linalg.vector_norm(rows[:, :, step:], dim=(1, 2),
                                                  dtype=torch.float64).square()
    return total


def gram_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``||X^T X||_F^2`` (float64) from the smaller of ``X^T X`` and ``X X^T`` (their
    squared norms are equal), by ``product_sq_norms``."""
    smaller_side = x.T if x.shape[0] >= x.shape[1] else x  # Y with Y Y^T the smaller product
    return product_sq_norms(smaller_side.unsqueeze(0))[0]


@dataclass(frozen=True)
class Sequences:
    """How rows split into whole sequences, consecutive in row order: each one's row
    count and, for ``blend: auto``'s held-out folds, how many rows at the front are fold
    0's (the rest are fold 1's). Made once per calibration batch and reused by every
    group of every layer, so is where that batch's zero-padded layout is kept."""

    lengths: Tuple[int, ...]
    fold_rows: Optional[int] = None
    _layouts: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    @cached_property
    def nonempty(self) -> List[int]:
        return [n for n in self.lengths if n]  # an empty sequence has no rows and no Gram

    def padded_layout(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Where each row goes among ``sequences x longest`` zero-padded rows (the
        longest: ``max(lengths)``), and the sequences' row counts (float64)."""
        if device not in self._layouts:
            counts = torch.tensor(self.nonempty, device=device)
            slots = torch.arange(max(self.lengths), device=device) < counts[:, None]
            self._layouts[device] = (slots.flatten().nonzero().squeeze(1), counts.double())
        return self._layouts[device]


def sequence_spread(x: torch.Tensor, sequences: Union[Sequences, Sequence[int]]) -> float:
    """``sum_s ||offdiag(X_s^T X_s)||^2 / n_s`` over consecutive sequences of rows (empty
    ones have no rows), whose diagonal part is ``sum_k (sum_i x_ik^2)^2``. The products
    are formed in the rows' dtype, like the Gram's, and summed in float64.

    Short sequences (or narrow inputs) are padded into one batched product: one call
    per sequence cost 2-7x more on the zoos' shapes. Sequences of one length (records cut
    at ``max_seq_len``) are a view of the rows, so one batched product needs no padding.
    Other long ones go one by one. Every product is blocked (``product_sq_norms``)."""
    if not isinstance(sequences, Sequences):
        sequences = Sequences(tuple(int(n) for n in sequences))
    lengths = sequences.nonempty
    if min(max(lengths), x.shape[1]) < 2 * GRAM_BLOCK:
        return _spread_batched(x, sequences)
    if len(lengths) > 1 and min(lengths) == max(lengths):
        seqs = x.view(len(lengths), lengths[0], x.shape[1])
        return _spread_of_stacked(seqs, seqs.new_full((len(lengths),), lengths[0], dtype=torch.float64))
    total = 0.0
    for seq in x.split(lengths):
        diag = column_dots(seq, seq).double().square().sum()  # diag(X_s^T X_s), as the product's
        total += float(gram_sq_norm(seq) - diag) / seq.shape[0]
    return total


def _spread_batched(x: torch.Tensor, sequences: Sequences) -> float:
    slots, counts = sequences.padded_layout(x.device)
    count, width = counts.shape[0], x.shape[1]
    longest = int(max(sequences.lengths))
    # padding rows add nothing
    padded = x.new_zeros(count * longest, width).index_copy_(0, slots, x).view(count, longest, width)
    return _spread_of_stacked(padded, counts, scratch=True)


def _spread_of_stacked(seqs: torch.Tensor, counts: torch.Tensor, scratch: bool = False) -> float:
    """``sequence_spread`` of ``[sequences, rows, width]`` sequences (zero rows pad the
    shorter ones) of ``counts`` rows each (float64); ``scratch``: ``seqs`` may be overwritten."""
    count, longest, width = seqs.shape
    # the smaller side: X_s X_s^T, or X_s^T X_s for sequences longer than they are wide
    full = product_sq_norms(seqs if longest <= width else seqs.transpose(1, 2))
    # diag(X_s^T X_s): the column sums of squares, as a product (a strided sum is slow)
    squares = seqs.square_() if scratch else seqs.square()
    columns = torch.bmm(seqs.new_ones(count, 1, longest), squares).squeeze(1)
    diag = columns.to(torch.float64).square().sum(1)
    return float(((full - diag) / counts).sum())


def gram_inner(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``tr(D G D^T)`` (as float64) for a symmetric ``G``, as ``<G, D^T D>`` from the upper
    block triangle of ``D^T D`` (``upper_gram``). The dots are in the inputs' dtype: for
    float32 a diagnostic's precision (about 1e-6 relative), at 1.3-3x less time than
    ``sum((D G) * D)``."""
    return _symmetric_inner(upper_gram(d), gram,
                            lambda a, b: torch.dot(a.flatten(), b.flatten()).double())


@dataclass
class Moments:
    """Running sums of ``X^T X`` (and optionally ``X^T Z``) over tokens.

    Each batch's product is formed in the activations' dtype (one matmul per
    batch, never per token; the Gram's upper block triangle only) and added
    into a float64 accumulator, so long calibration sets do not lose precision.

    Two optional extras need the rows' ``Sequences``: with ``track_spread`` (for
    ``alpha: auto``), the number of sequences and ``spread = sum_s ||offdiag(U_s)||^2 /
    n_s`` with ``U_s = X_s^T X_s``, formed from the smaller of ``X_s X_s^T`` and ``X_s^T
    X_s`` (``sequence_spread``); with ``held_out`` (for ``blend: auto``), ``folds``: the
    same sums over two folds of whole sequences, whose rows come fold by fold
    (``Sequences.fold_rows``), so each fold's product is taken from a slice, not a copy.

    The targets' moment ``X^T Z`` comes in one of two forms: whole (``cross``), or, for a
    group whose linears have no more outputs in all than inputs (Llama's ``o_proj`` and
    ``down_proj``), as each linear's ``X^T Y`` with ``Y = Z W^T`` its output in the expert's own layer
    (``outputs``, by weight name) and the diagonal of ``X^T Z`` (``cross_diag``, for the
    shrinkage): ``X^T Y = (X^T Z) W^T`` is all a solve uses, and costs ``in x out``
    rather than ``in x in`` per token (``statistics.GroupStatistics.by_outputs``).
    """

    gram: Optional[torch.Tensor] = None  # upper block triangle, unless one block
    cross: Optional[torch.Tensor] = None
    outputs: Optional[Dict[str, torch.Tensor]] = None  # X^T Y per linear, instead of cross
    cross_diag: Optional[torch.Tensor] = None  # diag(X^T Z), with outputs
    count: int = 0
    sequences: int = 0
    spread: float = 0.0
    track_spread: bool = False
    folds: Optional[List["Moments"]] = None
    finished: bool = False  # the sums were turned into means, in place

    @classmethod
    def held_out_pair(cls, track_spread: bool = False) -> "Moments":
        return cls(track_spread=track_spread, folds=[cls(), cls()])

    def _add_products(self, x: torch.Tensor, z: Optional[torch.Tensor],
                      outputs: Optional[Dict[str, torch.Tensor]] = None) -> None:
        if self.finished:
            raise ValueError("these moments' means were taken: they take no more batches")
        width = x.shape[1]
        if self.gram is None:  # float64 accumulators; each product is added in place
            self.gram = torch.zeros(width, width, dtype=torch.float64, device=x.device)
        add_upper_gram(self.gram, x)
        if outputs is not None:
            if self.outputs is None:
                self.outputs = {n: torch.zeros(width, y.shape[1], dtype=torch.float64, device=x.device)
                                for n, y in outputs.items()}
                self.cross_diag = torch.zeros(width, dtype=torch.float64, device=x.device)
            for name, y in outputs.items():
                self.outputs[name].add_(x.T @ y)
            self.cross_diag.add_(column_dots(x, z))  # per batch in x's dtype, as the Gram
        elif z is not None:
            if self.cross is None:
                self.cross = torch.zeros(width, z.shape[1], dtype=torch.float64, device=x.device)
            self.cross.add_(x.T @ z)
        self.count += x.shape[0]

    def add(self, x: torch.Tensor, z: Optional[torch.Tensor] = None,
            sequences: Optional[Sequences] = None,
            outputs: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """One batch's rows ``x`` and, for the targets, ``z`` (the expert's own inputs) and
        optionally ``outputs`` (its linears' outputs, ``Z W^T`` each: then ``X^T Y`` is
        kept per linear instead of ``X^T Z``)."""
        if x.shape[0] == 0:
            return
        if sequences is not None:
            if sum(sequences.lengths) != x.shape[0]:
                raise ValueError(f"sequence lengths sum to {sum(sequences.lengths)}, not {x.shape[0]} rows")
        elif self.track_spread or self.folds is not None:
            raise ValueError("these moments need the rows' sequences")
        if outputs is not None and z is None:
            raise ValueError("the outputs' moments need the inputs they were computed on")
        if self.folds is None:
            self._add_products(x, z, outputs)
        else:
            if sequences.fold_rows is None:
                raise ValueError("held-out moments need the rows ordered fold by fold")
            cut = sequences.fold_rows
            for part, rows in zip(self.folds, (slice(None, cut), slice(cut, None))):
                part._add_products(x[rows], None if z is None else z[rows],
                                   None if outputs is None else {n: y[rows] for n, y in outputs.items()})
        if self.track_spread:
            self._add_spread(x, sequences)

    def _add_spread(self, x: torch.Tensor, sequences: Sequences) -> None:
        count = len(sequences.nonempty)
        if count:
            self.spread += sequence_spread(x, sequences)
            self.sequences += count

    def sum_folds(self) -> None:
        """The totals of a held-out pair, from its folds (once, when all batches are in)."""
        if self.folds is not None:
            f0, f1 = self.folds
            if f0.finished or f1.finished:
                raise ValueError("sum the folds before taking their means")
            self.gram = f0.gram + f1.gram
            self.cross = f0.cross + f1.cross if f0.cross is not None else None
            if f0.outputs is not None:
                self.outputs = {n: f0.outputs[n] + f1.outputs[n] for n in f0.outputs}
                self.cross_diag = f0.cross_diag + f1.cross_diag
            self.count = f0.count + f1.count

    def mean_gram(self) -> torch.Tensor:
        """The mean (full, symmetric) Gram. The first call turns the sums into the means
        in place (a fresh ``in x in`` buffer costs more than the division at LLM widths);
        after it, the moments take no more batches."""
        self._finish()
        return self.gram

    def mean_cross(self) -> torch.Tensor:
        self._finish()
        if self.cross is None:
            raise ValueError("no calibration tokens reached this layer")
        return self.cross

    def mean_outputs(self) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """The means of ``X^T Y`` per linear and of ``diag(X^T Z)``."""
        self._finish()
        if self.outputs is None:
            raise ValueError("no calibration tokens reached this layer")
        return self.outputs, self.cross_diag

    def _finish(self) -> None:
        if self.finished:
            return
        if self.gram is None or self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        symmetric(self.gram.div_(self.count))  # a no-op for a single block
        for moment in (self.cross, self.cross_diag, *(self.outputs or {}).values()):
            if moment is not None:
                moment.div_(self.count)
        self.finished = True


def shrinkage_alpha(mean_gram: torch.Tensor, count: int, sequences: int, spread: float) -> float:
    """The off-diagonal keep ratio ``alpha`` estimated from the data (``alpha: auto``).

    The Ledoit-Wolf shrinkage intensity towards the diagonal (target "D" of Schäfer &
    Strimmer 2005, after Ledoit & Wolf 2004): with ``G = sum_s U_s / N`` the mean Gram
    over ``N`` tokens in ``m`` sequences, ``delta = sum_{i!=j} Var(g_ij) / sum_{i!=j}
    g_ij^2``, clipped to [0, 1], and ``alpha = 1 - delta``. The variance of each entry
    is estimated across sequences (tokens of one sequence are not independent):
    ``Var(g_ij) = sum_s n_s (G_s,ij - g_ij)^2 / (N (m - 1))`` with ``G_s = U_s / n_s``,
    which sums over ``i != j`` to ``(spread - N * offdiag_sq(G)) / (N (m - 1))``.
    Few sequences give a large variance, so strong shrinkage (no collapse of a
    rank-deficient Gram); many give ``alpha`` near 1 (no over-shrinking).
    """
    gamma = offdiag_sq(mean_gram)
    if gamma <= 0:
        return 1.0  # already diagonal: shrinking changes nothing
    if sequences < 2:
        return 0.0  # no estimate of the variance: keep only the diagonal
    pi = max(spread - count * gamma, 0.0) / (count * (sequences - 1))
    return 1.0 - min(1.0, pi / gamma)


def with_ones_column(x: torch.Tensor) -> torch.Tensor:
    """Append a constant input so a bias is solved jointly with its weight."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def add_shrunk(total: torch.Tensor, gram: torch.Tensor, alpha: float, weight: float = 1.0) -> torch.Tensor:
    """``total += weight * (alpha * G + (1 - alpha) * diag(G))``, in place (no ``in x in``
    temporaries)."""
    total.add_(gram, alpha=weight * alpha)
    if alpha != 1.0:
        total.diagonal().add_(gram.diagonal(), alpha=weight * (1.0 - alpha))
    return total


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: RegMean's off-diagonal shrinkage."""
    if alpha == 1.0:
        return gram
    return add_shrunk(torch.zeros_like(gram), gram, alpha)


class RidgeSolver:
    """One Cholesky factorisation of ``sum_t w_t A_t + eps I``, many right-hand sides.

    ``eps = ridge * mean(diag)``. Linears that share an input (q/k/v, gate/up)
    share the left-hand side, so they share this object and its factor.

    A float64 ``lhs`` is taken over: the ridge is added to its diagonal in place (a
    copy of a fresh ``in x in`` buffer cost more than the factorisation at small widths).
    """

    def __init__(self, lhs: torch.Tensor, ridge: float, name: str = "layer"):
        ridged = lhs.to(torch.float64)
        scale = ridged.diagonal().mean().item()
        if not all_finite(ridged):
            raise FloatingPointError(f"non-finite calibration statistics for {name}")
        if scale <= 0:
            # Every input feature is zero on every token: nothing to fit.
            scale = 1.0
        eps, added = max(ridge, 0.0) * scale, 0.0
        for attempt in range(8):
            ridged.diagonal().add_(eps - added)  # on a retry, only the raise
            added = eps
            factor, info = torch.linalg.cholesky_ex(ridged)
            if info.item() == 0:
                break
            # Rank-deficient Gram (e.g. fewer tokens than input features):
            # regularise harder rather than return NaN.
            eps = max(eps * 100.0, 1e-10 * scale)
            LOG.warning(
                "%s: calibration Gram is singular; raising the ridge to %.3g "
                "(give more calibration tokens or a smaller alpha)",
                name,
                eps / scale,
            )
        else:  # pragma: no cover - only reachable with adversarial input
            raise FloatingPointError(f"could not factorise the Gram of {name}")
        self.factor = factor
        self.eps = eps
        self._factors = {torch.float64: factor}  # the factor in each dtype a solve asked for
        self._inverses: Dict[torch.dtype, torch.Tensor] = {}

    def solve(self, rhs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``A^-1 rhs`` in ``dtype``: float64 for a merged weight; the held-out folds, of
        which only a scalar comes out, solve in the activations' dtype (the factor is
        always computed in float64, then rounded once).

        A right-hand side with at least as many columns as ``A`` goes through ``A^-1``
        (formed once from the factor, in float64, and kept): one product instead of two
        triangular solves, 1.1-2.1x faster at pico's widths on one CPU thread (the solvers
        of q/k/v and gate/up take several); a narrower one through the factor."""
        if rhs.shape[1] >= self.factor.shape[0]:
            if dtype not in self._inverses:
                self._inverses[dtype] = torch.cholesky_inverse(self.factor).to(dtype)
            return self._inverses[dtype] @ rhs.to(dtype)
        if dtype not in self._factors:
            self._factors[dtype] = self.factor.to(dtype)
        return torch.cholesky_solve(rhs.to(dtype), self._factors[dtype])


def _per_expert(alpha: Union[float, Sequence[float]], n: int) -> List[float]:
    return [float(a) for a in alpha] if isinstance(alpha, (list, tuple)) else [float(alpha)] * n


def regmean_lhs(
    grams: Sequence[torch.Tensor], weights: Sequence[float], alpha: Union[float, Sequence[float]]
) -> torch.Tensor:
    """``sum_t w_t G~_t``; ``alpha`` one value, or one per expert."""
    alphas = _per_expert(alpha, len(grams))
    total = torch.zeros_like(grams[0])
    for g, w, a in zip(grams, weights, alphas):
        add_shrunk(total, g, a, w)
    return total


def blend_rhs(
    grams: Sequence[torch.Tensor],
    crosses: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: Union[float, Sequence[float]],
    share: float,
    expert_weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``sum_t w_t ((1 - b) G~_t + b C~_t) W_t^T`` with ``W_t`` given HF-style ``[out, in]``.

    ``b = 0`` is regmean's right-hand side (no ``crosses`` needed), ``b = 1``
    match_expert's with ``C_t = X_t^T Z_t / n_t`` (so ``C_t W_t^T = X_t^T Y_t / n_t``
    for ``Y_t = Z_t W_t^T``). Shrinkage is linear, so the moments are mixed first
    and each expert costs one ``in x in x out`` product.
    """
    alphas = _per_expert(alpha, len(grams))
    total = 0.0
    for t, (w, a, wt) in enumerate(zip(weights, alphas, expert_weights)):
        if share == 0.0:
            moment = grams[t]
        elif share == 1.0:
            moment = crosses[t]
        else:
            moment = (1.0 - share) * grams[t] + share * crosses[t]
        total = total + w * (shrink(moment, a) @ wt.to(torch.float64).T)
    return total


def stats_blend_rhs(stats: "SharedInputStats", experts: List[Hashable], weights: Sequence[float],
                    alphas: Sequence[float], share: float, expert_weights: Sequence[torch.Tensor],
                    name: str) -> Tuple[torch.Tensor, Optional[List[float]]]:
    """``blend_rhs`` of ``stats`` for the linear ``name``, and each expert's ``tr(W_t G_t W_t^T)``
    where ``G_t W_t^T`` is formed on the way (None where it is not: the report's residuals
    form their own). For regmean's share of 0, and where the targets' moments were kept as
    ``C_t W_t^T`` (``outputs``), the two targets' products are shrunk and mixed: the Gram's
    costs one ``in x in x out`` product (none for ``share = 1``), the other none."""
    if share != 0.0 and not stats.outputs:
        return blend_rhs([stats.grams[e] for e in experts], [stats.crosses.get(e) for e in experts],
                         weights, alphas, share, expert_weights), None
    total, norms = None, []
    for e, w, a, wt in zip(experts, weights, alphas, expert_weights):
        weight_t = wt.to(torch.float64).T
        if a != 1.0 or share != 1.0:  # read elementwise below (match_expert's outputs: never)
            # contiguous: the row scaling and the norm on a transposed view cost 2-12x more
            weight_t = weight_t.contiguous()
        if share != 0.0:
            total = add_shrunk_product(total, stats.outputs[e][name], stats.cross_diags[e], weight_t,
                                       a, w * share)
        if share != 1.0:
            gram = stats.grams[e]
            product = gram @ weight_t
            norms.append(float(torch.dot(product.flatten(), weight_t.flatten())))
            total = add_shrunk_product(total, product, gram.diagonal(), weight_t, a, w * (1.0 - share))
    return total, norms or None


def add_shrunk_product(total: Optional[torch.Tensor], product: torch.Tensor, diagonal: torch.Tensor,
                       weight_t: torch.Tensor, alpha: float, weight: float = 1.0,
                       out: Optional[torch.Tensor] = None,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``total += weight * shrink(M, alpha) @ W^T``, in place, from ``M @ W^T`` (``product``)
    and ``diag(M)``: shrinkage only adds a diagonal term, a row scaling of ``W^T``
    (``weight_t``, contiguous: on a transposed view it is 4-12x slower). ``total`` None
    starts a sum in ``dtype`` (default ``weight_t``'s; into ``out`` when given: a view of a
    larger right-hand side). No ``in x out`` temporaries."""
    if total is None:
        if out is None:
            out = torch.empty(product.shape, dtype=dtype or weight_t.dtype, device=product.device)
        total = torch.mul(product, weight * alpha, out=out)
    else:
        total.add_(product, alpha=weight * alpha)
    if alpha != 1.0:
        total.addcmul_(diagonal.to(total.dtype)[:, None], weight_t, value=weight * (1.0 - alpha))
    return total


@dataclass
class SharedInputStats:
    """Per-expert mean statistics of one input shared by several linears."""

    grams: Dict[Hashable, torch.Tensor]
    crosses: Dict[Hashable, torch.Tensor] = field(default_factory=dict)
    # instead of crosses (Moments.outputs): C_t W_t^T per weight name, and diag(C_t)
    outputs: Dict[Hashable, Dict[str, torch.Tensor]] = field(default_factory=dict)
    cross_diags: Dict[Hashable, torch.Tensor] = field(default_factory=dict)
    counts: Dict[Hashable, int] = field(default_factory=dict)  # the tokens behind each mean
    # alpha: auto -- each expert's estimated keep ratio (shrinkage_alpha)
    auto_alpha: Dict[Hashable, float] = field(default_factory=dict)
    # blend: auto -- the same statistics over each of two folds of whole sequences
    folds: List["SharedInputStats"] = field(default_factory=list)
    last_blend: Optional[float] = None  # the share the last solve used (for the report)
    dtype: torch.dtype = torch.float64  # the activations' (held_out_blend's products run in it)
    _solvers: Dict[tuple, RidgeSolver] = field(default_factory=dict)

    def cross_diagonal(self, expert: Hashable) -> torch.Tensor:
        """``diag(C_t)``, whichever form the targets' moment was kept in."""
        if expert in self.cross_diags:
            return self.cross_diags[expert]
        return self.crosses[expert].diagonal()

    def alphas(self, experts: List[Hashable], alpha: Alpha) -> List[float]:
        """Each expert's keep ratio: the given value, or the estimate for ``auto``."""
        if alpha == AUTO:
            missing = [e for e in experts if e not in self.auto_alpha]
            if missing:
                raise ValueError("alpha: auto needs the sequence statistics of every expert")
            return [self.auto_alpha[e] for e in experts]
        return [float(alpha)] * len(experts)

    def solver(
        self,
        experts: List[Hashable],
        weights: List[float],
        alpha: Union[Alpha, Sequence[float]],
        ridge: float,
        name: str,
    ) -> RidgeSolver:
        alphas = tuple(self.alphas(experts, alpha) if alpha == AUTO else _per_expert(alpha, len(experts)))
        key = (tuple(experts), tuple(weights), alphas, ridge)
        if key not in self._solvers:
            lhs = regmean_lhs([self.grams[e] for e in experts], weights, list(alphas))
            self._solvers[key] = RidgeSolver(lhs, ridge, name=name)
        return self._solvers[key]


@dataclass
class FoldProducts:
    """``blend: auto``'s products for one linear, formed once in the activations' dtype:
    per fold and expert ``G_t W_t^T`` (``grams``) and ``(C_t - G_t) W_t^T`` (``diffs``; the
    difference is taken in float64 before the product, so a small one loses nothing to
    cancellation; where ``C_t W_t^T`` was kept (``outputs``), it is that minus ``grams``,
    taken in float64: no product), per fold the weighted Gram ``sum_t w_t G_t``
    (``held``), and each expert's ``W_t^T`` in that dtype (``weight_ts``, contiguous)."""

    grams: List[List[torch.Tensor]]
    diffs: List[List[torch.Tensor]]
    held: List[torch.Tensor]
    weight_ts: List[torch.Tensor]


def fold_products(stats: SharedInputStats, experts: List[Hashable], weights: List[float],
                  expert_weights: List[torch.Tensor], name: str) -> Optional[FoldProducts]:
    """The products of both folds for the linear ``name`` (None without two non-empty folds)."""
    if len(stats.folds) != 2 or any(not f.grams for f in stats.folds):
        return None
    dtype = stats.dtype
    out = FoldProducts([], [], [], [w.to(dtype).T.contiguous() for w in expert_weights])  # [in, out]
    for fold in stats.folds:
        grams = [fold.grams[e].to(dtype) for e in experts]
        out.grams.append([g @ wt for g, wt in zip(grams, out.weight_ts)])
        if fold.outputs:
            out.diffs.append([fold.outputs[e][name].sub(gw).to(dtype)
                              for e, gw in zip(experts, out.grams[-1])])
        else:
            out.diffs.append([(fold.crosses[e] - fold.grams[e]).to(dtype) @ wt
                              for e, wt in zip(experts, out.weight_ts)])
        held = grams[0] * weights[0]  # (in float64, ``grams`` are the statistics themselves)
        for g, w in zip(grams[1:], weights[1:]):
            held.add_(g, alpha=w)
        out.held.append(held)
    return out


def _fold_shares(stats: SharedInputStats, expert: Hashable) -> List[float]:
    """Each fold's share of the expert's tokens: its mean moments weigh that much in the whole's."""
    counts = [fold.counts[expert] for fold in stats.folds]
    return [n / sum(counts) for n in counts]


def fold_blend_rhs(
    stats: SharedInputStats,
    experts: List[Hashable],
    weights: List[float],
    alphas: Sequence[float],
    share: float,
    products: FoldProducts,
) -> torch.Tensor:
    """``blend_rhs`` (float64) from the folds' products: each expert's mean moment is
    its folds' means weighted by their token counts, so ``M_t W_t^T`` is the same
    combination of ``products`` (no ``in x in x out`` product), and shrinkage adds
    ``(1 - alpha) diag(M_t)`` times ``W_t^T`` (``diag`` from the float64 statistics).
    The products are the activations' dtype: float32 sums at ``in`` terms each, the
    precision the Grams were formed with; they are mixed in place, then summed in float64."""
    total = None
    for t, (e, w, a) in enumerate(zip(experts, weights, alphas)):
        shares = _fold_shares(stats, e)
        mixed = torch.mul(products.grams[0][t], shares[0])  # the whole data's M_t W_t^T
        mixed.add_(products.grams[1][t], alpha=shares[1])
        if share != 0.0:
            for f, c in enumerate(shares):
                mixed.add_(products.diffs[f][t], alpha=c * share)
        gram_diag = stats.grams[e].diagonal()
        diag = gram_diag + share * (stats.cross_diagonal(e) - gram_diag)
        # W_t^T as the products were formed with it (contiguous; the float64 transposed view
        # cost 4-6x more here), the sum in float64
        total = add_shrunk_product(total, mixed, diag, products.weight_ts[t], a, w, dtype=torch.float64)
    return total


def fold_target_norms(stats: SharedInputStats, experts: List[Hashable],
                      products: FoldProducts) -> List[float]:
    """Each expert's ``tr(W_t G_t W_t^T)`` over the whole data, from its folds' products
    ``G_t W_t^T`` weighted by their token counts (no product of its own)."""
    return [sum(c * inner(products.grams[f][t], products.weight_ts[t])
                for f, c in enumerate(_fold_shares(stats, e)))
            for t, e in enumerate(experts)]


def held_out_blend(
    stats: SharedInputStats,
    experts: List[Hashable],
    weights: List[float],
    expert_weights: List[torch.Tensor],
    alphas: Sequence[float],
    ridge: float,
    name: str = "linear",
    products: Optional[FoldProducts] = None,
) -> float:
    """``blend: auto``: the share of the match_expert target that best predicts each
    expert's own outputs on held-out calibration sequences.

    Two-fold cross-validation over ``stats.folds``: on one fold, solve the regmean
    merge ``V_r`` and ``D = V_m - V_r``, its difference to the match_expert merge;
    every blend is ``V_r + b D``. On the other fold, the match_expert loss
    ``sum_t w_t ||X_t V - Z_t W_t^T||^2 / n_t`` is quadratic in ``b``, so the best
    ``b`` over both directions is ``sum (tr(D^T R) - tr(D^T G V_r)) / sum tr(D^T G D)``
    (``G = sum_t w_t G_t``, ``R = sum_t w_t C_t W_t^T`` of the held-out fold,
    unshrunk), clipped to [0, 1]. Without two non-empty folds it is 0.5.

    Only this scalar comes out, so everything after the float64 factorisations runs in
    the activations' dtype (``stats.dtype``; float32 unless the walk is float64):
    ``products`` (``fold_products``; formed here when not given), every shrunk and
    held-out product that follows from them, and the solves for ``V_r`` and ``D``,
    whose two right-hand sides are summed in place side by side.
    """
    if products is None:
        products = fold_products(stats, experts, weights, expert_weights, name)
    if products is None:
        return 0.5
    dtype, weight_ts = stats.dtype, products.weight_ts
    width, outputs = weight_ts[0].shape
    num = den = 0.0
    for train, test in ((0, 1), (1, 0)):
        fold = stats.folds[train]
        solver = fold.solver(experts, weights, list(alphas), ridge, f"{name} (held-out fold)")
        rhs = torch.empty(width, 2 * outputs, dtype=dtype, device=weight_ts[0].device)
        rhs_r = rhs_d = None
        for t, (e, w, a) in enumerate(zip(experts, weights, alphas)):
            gram_diag = fold.grams[e].diagonal()
            rhs_r = add_shrunk_product(rhs_r, products.grams[train][t], gram_diag, weight_ts[t], a, w,
                                       out=rhs[:, :outputs])
            diff_diag = fold.cross_diagonal(e) - gram_diag
            rhs_d = add_shrunk_product(rhs_d, products.diffs[train][t], diff_diag, weight_ts[t], a, w,
                                       out=rhs[:, outputs:])
        v_r, d = solver.solve(rhs, dtype).tensor_split(2, dim=1)
        r = torch.mul(products.grams[test][0], weights[0])  # R: the held-out C_t W_t^T, weighted
        for t, w in enumerate(weights):
            if t:
                r.add_(products.grams[test][t], alpha=w)
            r.add_(products.diffs[test][t], alpha=w)
        gd = products.held[test] @ d
        num += inner(d, r) - inner(gd, v_r)
        den += inner(d, gd)
    if den <= 0:
        return 0.5  # the two merges agree on the held-out tokens: any share will do
    return min(1.0, max(0.0, num / den))
