"""The pure math, without mergekit or transformers."""

import pytest
import torch

from mergekit_com.method import linalg
from mergekit_com.method.parameters import SolveSettings
from mergekit_com.method.parameters import Objective
from mergekit_com.method.strategies import OBJECTIVES, RegMeanObjective


def solve(stats, experts, weights, targets, alpha, ridge):
    settings = SolveSettings(alpha=alpha, ridge=ridge, weights=tuple(weights))
    return RegMeanObjective().solve(stats, experts, targets, settings, name="test").weight


def solved_with(objective, stats, experts, weights, targets, alpha, ridge, blend=0.5):
    settings = SolveSettings(alpha=alpha, ridge=ridge, weights=tuple(weights), blend=blend)
    return OBJECTIVES[Objective(objective)].solve(stats, experts, targets, settings, name="test")


def solve_with(*args, **kwargs):
    return solved_with(*args, **kwargs).weight


def test_moments_are_batch_invariant_and_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g)
    whole, parts = linalg.Moments(), linalg.Moments()
    whole.add(x)
    for chunk in x.split(7):
        parts.add(chunk)
    assert parts.count == 100 and parts.gram.dtype == torch.float64
    # per-batch products are float32 (fast), the running sum float64
    torch.testing.assert_close(parts.mean_gram(), x.double().T @ x.double() / 100, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.mean_gram(), whole.mean_gram(), rtol=1e-6, atol=1e-6)


def test_shrink_keeps_diagonal_scales_off_diagonal():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    out = linalg.shrink(gram, 0.25)
    torch.testing.assert_close(out, torch.tensor([[4.0, 0.5], [0.5, 9.0]], dtype=torch.float64))
    assert linalg.shrink(gram, 0.0)[0, 1] == 0


def test_regmean_with_alpha_zero_is_a_per_feature_weighted_average():
    # With diagonal Grams, each input feature's column is averaged with weights
    # proportional to how strongly each expert's data excites that feature.
    g1 = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    g2 = torch.diag(torch.tensor([1.0, 1.0], dtype=torch.float64))
    w1 = torch.tensor([[1.0, 1.0]])
    w2 = torch.tensor([[3.0, 5.0]])
    stats = linalg.SharedInputStats(grams={"a": g1, "b": g2})
    merged = solve(stats, ["a", "b"], [1.0, 1.0], [w1, w2], alpha=0.0, ridge=0.0)
    torch.testing.assert_close(merged, torch.tensor([[2.0, 2.0]], dtype=torch.float64))


def test_rank_deficient_gram_never_gives_nan():
    x = torch.randn(3, 16, dtype=torch.float64)  # 3 tokens, 16 features
    gram = x.T @ x / 3
    stats = linalg.SharedInputStats(grams={"a": gram, "b": gram.clone()})
    ws = [torch.randn(4, 16), torch.randn(4, 16)]
    for ridge in (0.0, 1e-12, 1e-5):
        merged = solve(stats, ["a", "b"], [1.0, 1.0], ws, alpha=1.0, ridge=ridge)
        assert torch.isfinite(merged).all()
        # on the directions the data spans, the merge reproduces the average output
        torch.testing.assert_close(x @ merged.T, x @ ((ws[0] + ws[1]) / 2).double().T,
                                   rtol=1e-4, atol=1e-4)


def test_all_zero_inputs_do_not_break_the_solver():
    stats = linalg.SharedInputStats(grams={"a": torch.zeros(4, 4, dtype=torch.float64)})
    merged = solve(stats, ["a"], [1.0], [torch.ones(2, 4)], alpha=0.9, ridge=1e-5)
    assert torch.isfinite(merged).all()


def test_shared_input_factorisation_is_reused():
    gram = torch.eye(3, dtype=torch.float64)
    stats = linalg.SharedInputStats(grams={"a": gram})
    s1 = stats.solver(["a"], [1.0], 0.9, 1e-5, "q")
    assert stats.solver(["a"], [1.0], 0.9, 1e-5, "k") is s1
    assert stats.solver(["a"], [1.0], 0.5, 1e-5, "k") is not s1


def test_blocked_upper_gram_completes_to_the_full_product():
    torch.manual_seed(0)
    for width in (64, 300, 512, 1100):
        x = torch.randn(40, width, dtype=torch.float64)
        moments = linalg.Moments()
        moments.add(x[:25])
        moments.add(x[25:])
        torch.testing.assert_close(moments.mean_gram(), x.T @ x / 40)
        if linalg.gram_blocks(width) > 1:  # the lower blocks were never computed
            upper = linalg.upper_gram(x)
            assert upper[-1, 0] == 0 and upper[0, -1] != 0
        # float32 products added block by block into a float64 sum: exactly the sum of the
        # whole products, converted
        x32, total = x.float(), torch.zeros(width, width, dtype=torch.float64)
        linalg.add_upper_gram(linalg.add_upper_gram(total, x32[:25]), x32[25:])
        assert torch.equal(total, linalg.upper_gram(x32[:25]).double() + linalg.upper_gram(x32[25:]).double())


def test_gram_norm_from_either_side_of_the_product():
    torch.manual_seed(0)
    for rows, width in ((40, 300), (300, 40), (700, 512), (5, 5)):
        x = torch.randn(rows, width, dtype=torch.float64)
        torch.testing.assert_close(linalg.gram_sq_norm(x), (x.T @ x).square().sum())


@pytest.mark.parametrize("rows", [1, 31, 64, 100, 257, 1000])  # 1, 1, 2, 3, 8, 8 blocks
def test_product_norms_from_the_upper_row_blocks(rows):
    y = torch.randn(2, rows, 600, dtype=torch.float64)
    expected = torch.stack([(m @ m.T).square().sum() for m in y])
    torch.testing.assert_close(linalg.product_sq_norms(y), expected, rtol=1e-12, atol=0)
    # a transposed view (the X_s^T X_s side of a stack) gives its own products' norms
    torch.testing.assert_close(linalg.product_sq_norms(y.transpose(1, 2)),
                               torch.stack([(m.T @ m).square().sum() for m in y]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("width, lengths", [
    (40, [7, 3, 5]),  # short: one batched product, X_s X_s^T side
    (6, [30, 9, 17]),  # narrow: batched, X_s^T X_s side
    (300, [260, 256]),  # long and wide: one sequence at a time
    (520, [400, 390]),  # longer and wider: one sequence at a time, its longer side blocked
    (300, [260, 260, 260]),  # one length: one batched product, no padding
    (260, [300, 300]),  # ... from either side
])
@pytest.mark.parametrize("threads", [1, 2])
def test_sequence_spread_is_the_per_sequence_off_diagonal_energy(width, lengths, threads):
    x = torch.randn(sum(lengths), width, dtype=torch.float64)
    expected = 0.0
    for seq in x.split(lengths):
        u = seq.T @ seq
        expected += float((u - torch.diag(u.diagonal())).square().sum()) / len(seq)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert abs(linalg.sequence_spread(x, lengths) - expected) <= 1e-10 * expected
        got32 = linalg.sequence_spread(x.float(), lengths)  # float32 products, float64 sums
    finally:
        torch.set_num_threads(before)
    assert abs(got32 - expected) <= 1e-5 * expected


@pytest.mark.parametrize("out, width", [(5, 40), (300, 260), (7, 1100)])  # 1, 2 and 8 blocks
def test_gram_inner_is_the_trace_of_d_g_dt(out, width):
    d = torch.randn(out, width, dtype=torch.float64)
    x = torch.randn(2 * width, width, dtype=torch.float64)
    gram = x.T @ x
    expected = torch.trace(d @ gram @ d.T)
    torch.testing.assert_close(linalg.gram_inner(d, gram), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(linalg.gram_inner(d.float(), gram.float()), expected, rtol=1e-5, atol=0)


def test_means_are_taken_once_and_end_the_sums():
    x = torch.randn(30, 300, dtype=torch.float64)
    moments = linalg.Moments()
    moments.add(x, x[:, :7])
    first = moments.mean_gram()
    assert moments.mean_gram() is first  # not divided twice
    torch.testing.assert_close(moments.mean_cross(), x.T @ x[:, :7] / 30)
    with pytest.raises(ValueError, match="take no more batches"):
        moments.add(x)


def _independent_alpha(seqs):
    """Schäfer-Strimmer target D, computed entry by entry from per-sequence mean Grams."""
    xs = [s.double() for s in seqs]
    n = torch.tensor([float(len(s)) for s in xs], dtype=torch.float64)
    total = n.sum()
    g = sum(s.T @ s for s in xs) / total
    per_seq = torch.stack([s.T @ s / len(s) for s in xs])  # [m, d, d]
    m = len(xs)
    var = (n[:, None, None] * (per_seq - g).square()).sum(0) / (total * (m - 1))
    off = ~torch.eye(g.shape[0], dtype=torch.bool)
    delta = min(1.0, max(0.0, float(var[off].sum() / g[off].square().sum())))
    return 1.0 - delta


def test_auto_alpha_matches_an_independent_computation():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(5, 5, generator=g)
    seqs = [torch.randn(int(k), 5, generator=g) @ mix for k in torch.randint(2, 9, (12,), generator=g)]
    mo = linalg.Moments(track_spread=True)
    for i in range(0, 12, 4):  # three batches of four sequences (and an empty one: no sequence)
        batch = seqs[i:i + 4]
        mo.add(torch.cat(batch), sequences=linalg.Sequences(tuple(len(s) for s in batch) + (0,)))
    assert mo.sequences == 12 and mo.count == sum(len(s) for s in seqs)
    got = linalg.shrinkage_alpha(mo.mean_gram(), mo.count, mo.sequences, mo.spread)
    assert abs(got - _independent_alpha(seqs)) < 1e-6  # the Gram sums float32 batch products
    assert 0.0 < got < 1.0


def test_auto_alpha_shrinks_few_samples_hard_and_many_samples_little():
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(16, 16, generator=g) / 4 + torch.eye(16)

    def alpha(num_seqs):
        mo = linalg.Moments(track_spread=True)
        for _ in range(num_seqs):
            mo.add(torch.randn(8, 16, generator=g) @ mix, sequences=linalg.Sequences((8,)))
        return linalg.shrinkage_alpha(mo.mean_gram(), mo.count, mo.sequences, mo.spread)

    few, some, many = alpha(3), alpha(30), alpha(3000)
    assert few < some < many
    assert few < 0.6 and many > 0.95
    # one sequence leaves no variance estimate: only the diagonal is kept
    assert alpha(1) == 0.0
    # a diagonal Gram has nothing to shrink
    assert linalg.shrinkage_alpha(torch.eye(3, dtype=torch.float64), 10, 2, 5.0) == 1.0


def test_blend_is_the_weighted_sum_of_both_objectives():
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    z = [xi + 0.1 * torch.randn(40, 6, generator=g, dtype=torch.float64) for xi in x]
    ws = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    stats = linalg.SharedInputStats(grams={i: x[i].T @ x[i] / 40 for i in range(2)},
                                    crosses={i: x[i].T @ z[i] / 40 for i in range(2)})

    def solve(objective, share=0.5, alpha=1.0):
        return solve_with(objective, stats, [0, 1], [1.0, 1.0], ws, alpha=alpha, ridge=0.0, blend=share)

    # least squares of (1 - b) ||X V - X W^T||^2 + b ||X V - Z W^T||^2, summed over experts
    b = 0.3
    xs = torch.cat([x[0], x[1]])
    target = torch.cat([(1 - b) * x[i] @ ws[i].T + b * z[i] @ ws[i].T for i in range(2)])
    expected = torch.linalg.lstsq(xs, target).solution.T
    torch.testing.assert_close(solve("blend", b), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(solve("blend", 0.0), solve("regmean"))
    torch.testing.assert_close(solve("blend", 1.0), solve("match_expert"))
    # under blend, alpha shrinks the cross moments like the Grams: alpha 0 is per-feature
    v = solve("blend", 1.0, alpha=0.0)
    lhs = sum(torch.diag(torch.diag(stats.grams[i])) for i in range(2))
    rhs = sum(torch.diag(torch.diag(stats.crosses[i])) @ ws[i].T for i in range(2))
    torch.testing.assert_close(v, torch.linalg.solve(lhs, rhs).T)


def test_auto_alpha_is_used_per_expert():
    gram_a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    stats = linalg.SharedInputStats(grams={"a": gram_a, "b": gram_a.clone()},
                                    auto_alpha={"a": 1.0, "b": 0.0})
    ws = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    got = solve_with("regmean", stats, ["a", "b"], [1.0, 1.0], ws, alpha="auto", ridge=0.0)
    lhs = gram_a + torch.diag(torch.diag(gram_a))
    rhs = gram_a @ ws[0].double().T + torch.diag(torch.diag(gram_a)) @ ws[1].double().T
    torch.testing.assert_close(got, torch.linalg.solve(lhs, rhs).T)


def _fold_stats(xs, zs):
    return linalg.SharedInputStats(grams={i: x.T @ x / len(x) for i, x in enumerate(xs)},
                                   crosses={i: x.T @ z / len(x) for i, (x, z) in enumerate(zip(xs, zs))})


def test_held_out_blend_minimises_the_held_out_match_loss():
    g = torch.Generator().manual_seed(4)
    d, n = 8, 12  # few tokens per fold: the match_expert fit does not carry over fully
    ws = [torch.randn(3, d, generator=g, dtype=torch.float64) for _ in range(2)]
    drift = [torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
             for _ in range(2)]
    folds = []
    for _ in range(2):
        xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
        zs = [x @ m + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) for x, m in zip(xs, drift)]
        folds.append((xs, zs))
    stats = linalg.SharedInputStats(grams={}, folds=[_fold_stats(*f) for f in folds])
    share = linalg.held_out_blend(stats, [0, 1], [1.0, 1.0], ws, [1.0, 1.0], ridge=1e-9)

    def held_out_loss(b):  # brute force: fit each blend on one fold, score the other
        total = 0.0
        for train, test in ((0, 1), (1, 0)):
            xs, zs = folds[train]
            target = torch.cat([(1 - b) * x @ w.T + b * z @ w.T for x, z, w in zip(xs, zs, ws)])
            weights = torch.cat([torch.full((n,), 1 / n, dtype=torch.float64)] * 2).sqrt()[:, None]
            v = torch.linalg.lstsq(torch.cat(xs) * weights, target * weights).solution
            tx, tz = folds[test]
            total += sum(((x @ v - z @ w.T) ** 2).sum() / n for x, z, w in zip(tx, tz, ws))
        return float(total)

    grid = [i / 200 for i in range(201)]
    best = min(grid, key=held_out_loss)
    assert 0.0 < share < 1.0
    assert abs(share - best) <= 0.005 + 1e-9
    assert held_out_loss(share) <= held_out_loss(best) + 1e-9


def test_held_out_blend_in_float32_picks_the_float64_share():
    """The walk forms the folds' products in the activations' dtype (float32): only the
    share comes out, and it matches the float64 computation."""
    g = torch.Generator().manual_seed(5)
    d, n, k = 32, 48, 3
    ws = [torch.randn(16, d, generator=g, dtype=torch.float64) for _ in range(k)]
    drift = [torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
             for _ in range(k)]
    folds = []
    for _ in range(2):
        xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(k)]
        zs = [x @ m + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) for x, m in zip(xs, drift)]
        folds.append(_fold_stats(xs, zs))
    shares = {}
    for dtype in (torch.float64, torch.float32):
        stats = linalg.SharedInputStats(grams={}, folds=folds, dtype=dtype)
        shares[dtype] = linalg.held_out_blend(stats, list(range(k)), [1.0] * k, ws, [0.8] * k, ridge=1e-6)
    assert 0.0 < shares[torch.float64] < 1.0
    assert abs(shares[torch.float32] - shares[torch.float64]) < 1e-4


def test_fold_blend_rhs_is_blend_rhs_of_the_whole_data():
    """With ``blend: auto`` the final right-hand side comes from the folds' products: the
    same sums as ``blend_rhs`` on the whole data's moments, exactly in float64 and to
    float32's precision in float32."""
    g = torch.Generator().manual_seed(6)
    d, k = 24, 3
    ws = [torch.randn(10, d, generator=g, dtype=torch.float64) for _ in range(k)]
    sizes = [(30, 50), (41, 17), (25, 25)]  # tokens per fold, per expert: unequal folds
    xs = [[torch.randn(n, d, generator=g, dtype=torch.float64) for n in pair] for pair in sizes]
    zs = [[x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in pair] for pair in xs]

    def moments(x, z):
        return x.T @ x / len(x), x.T @ z / len(x), len(x)

    def stats_of(parts, dtype=torch.float64):
        return linalg.SharedInputStats(grams={e: p[0] for e, p in enumerate(parts)},
                                       crosses={e: p[1] for e, p in enumerate(parts)},
                                       counts={e: p[2] for e, p in enumerate(parts)}, dtype=dtype)

    whole = [moments(torch.cat(x), torch.cat(z)) for x, z in zip(xs, zs)]
    folds = [[moments(x[f], z[f]) for x, z in zip(xs, zs)] for f in range(2)]
    experts, weights, alphas, share = list(range(k)), [1.0, 0.5, 2.0], [0.9, 0.6, 1.0], 0.35
    want = linalg.blend_rhs([w[0] for w in whole], [w[1] for w in whole], weights, alphas, share, ws)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        stats = stats_of(whole, dtype)
        stats.folds = [stats_of(f) for f in folds]
        products = linalg.fold_products(stats, experts, weights, ws, "test")
        got = linalg.fold_blend_rhs(stats, experts, weights, alphas, share, products)
        assert got.dtype == torch.float64
        assert ((got - want).norm() / want.norm()).item() < tol
    stats.folds = []  # without folds there is nothing to build from
    assert linalg.fold_products(stats, experts, weights, ws, "test") is None


def _as_outputs(stats: linalg.SharedInputStats, ws, name: str) -> linalg.SharedInputStats:
    """The same statistics with the targets' moment kept as ``C_t W_t^T`` and ``diag(C_t)``
    (how the walk keeps it for a group with fewer outputs than inputs)."""
    return linalg.SharedInputStats(
        grams=stats.grams, counts=stats.counts, auto_alpha=stats.auto_alpha, dtype=stats.dtype,
        outputs={e: {name: c @ ws[e].T} for e, c in stats.crosses.items()},
        cross_diags={e: c.diagonal().clone() for e, c in stats.crosses.items()},
        folds=[_as_outputs(f, ws, name) for f in stats.folds])


@pytest.mark.parametrize("objective,blend,alpha", [
    ("blend", 0.35, 0.7), ("blend", 1.0, 0.5), ("match_expert", 0.5, 1.0), ("blend", "auto", "auto"),
    ("blend", "auto", 0.8), ("regmean", 0.5, 0.7)])
def test_targets_kept_as_outputs_solve_as_the_cross_moments_do(objective, blend, alpha):
    """``X^T Y`` per linear (``outputs``) is ``(X^T Z) W^T``: every objective, share and
    shrinkage solves to the same merge, and ``blend: auto`` picks the same share. Where
    a solve formed each expert's ``G_t W_t^T`` on the way it hands over ``tr(W_t G_t W_t^T)``
    (the report's residual norms): wherever the Gram's product enters apart from ``C_t``."""
    g = torch.Generator().manual_seed(7)
    d, k, out = 12, 3, 5
    ws = [torch.randn(out, d, generator=g, dtype=torch.float64) for _ in range(k)]

    def fold():
        xs = [torch.randn(30, d, generator=g, dtype=torch.float64) for _ in range(k)]
        zs = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
        return xs, zs

    parts = [fold(), fold()]
    xs = [torch.cat([parts[0][0][e], parts[1][0][e]]) for e in range(k)]
    zs = [torch.cat([parts[0][1][e], parts[1][1][e]]) for e in range(k)]
    stats = _fold_stats(xs, zs)
    stats.counts = {e: 60 for e in range(k)}
    stats.auto_alpha = {0: 0.9, 1: 0.6, 2: 1.0}
    stats.folds = [_fold_stats(*p) for p in parts]
    for f in stats.folds:
        f.counts = {e: 30 for e in range(k)}
    kept = _as_outputs(stats, ws, "test")
    weights = [1.0, 0.5, 2.0]
    want = solved_with(objective, stats, list(range(k)), weights, ws, alpha=alpha, ridge=1e-6, blend=blend)
    got = solved_with(objective, kept, list(range(k)), weights, ws, alpha=alpha, ridge=1e-6, blend=blend)
    torch.testing.assert_close(got.weight, want.weight, rtol=1e-10, atol=1e-12)
    share = {"regmean": 0.0, "match_expert": 1.0}.get(objective, blend)
    assert (want.target_norms is None) == (share not in (0.0, "auto"))
    assert (got.target_norms is None) == (share == 1.0)
    for norms in (want.target_norms, got.target_norms):
        for e, norm in enumerate(norms or []):
            assert norm == pytest.approx(float((ws[e] @ stats.grams[e] * ws[e]).sum()), rel=1e-10)
    if blend == "auto":
        assert 0.0 < stats.last_blend < 1.0
        assert abs(kept.last_blend - stats.last_blend) < 1e-10


@pytest.mark.parametrize("columns", [3, 8, 20])  # narrower than A, as wide, wider
def test_ridge_solver_solves_wide_and_narrow_right_hand_sides_alike(columns):
    """Narrow right-hand sides go through the Cholesky factor, wide ones through ``A^-1``
    formed once from it: both are ``A^-1 rhs`` (float64 to 1e-12, float32 to its precision)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    lhs = x.T @ x / 50
    rhs = torch.randn(8, columns, generator=g, dtype=torch.float64)
    solver = linalg.RidgeSolver(lhs.clone(), ridge=1e-3)  # it adds the ridge in place
    want = torch.linalg.solve(lhs + solver.eps * torch.eye(8, dtype=torch.float64), rhs)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        got = solver.solve(rhs, dtype)
        assert got.dtype == dtype
        assert ((got.double() - want).norm() / want.norm()).item() < tol
    assert bool(solver._inverses) == (columns >= 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_any_nan_or_inf_and_passes_a_sum_that_overflows(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((64, 3), big / 2, dtype=dtype)  # finite, though its sum is not
    assert linalg.all_finite(t) and linalg.all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0), (63, 2)):
            u = torch.randn(64, 3).to(dtype)
            u[where] = bad
            assert not linalg.all_finite(u)
            t2 = t.clone()
            t2[where] = bad
            assert not linalg.all_finite(t2)
    both = torch.randn(5).to(dtype)
    both[0], both[1] = float("inf"), float("-inf")  # they sum to NaN: still caught
    assert not linalg.all_finite(both)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_stop_the_solve_naming_the_linear(bad):
    lhs = torch.eye(4, dtype=torch.float64)
    lhs[2, 1] = lhs[1, 2] = bad
    with pytest.raises(FloatingPointError, match="non-finite calibration statistics for model.q_proj"):
        linalg.RidgeSolver(lhs, ridge=1e-6, name="model.q_proj")


def test_inner_and_column_dots_sum_in_the_tensors_dtype_then_float64():
    """Products and each column's sum in the tensors' dtype, the columns added in float64:
    float64 to its own precision, float32 to the precision its products carry."""
    g = torch.Generator().manual_seed(11)
    a, b = (torch.randn(700, 300, generator=g, dtype=torch.float64) for _ in range(2))
    want = float((a * b).sum())
    assert linalg.inner(a, b) == pytest.approx(want, rel=1e-12)
    # the sum cancels (random signs): measured against the sizes of its terms
    assert abs(linalg.inner(a.float(), b.float()) - want) <= 1e-6 * float(a.norm() * b.norm())
    torch.testing.assert_close(linalg.column_dots(a, b), (a * b).sum(0))
    assert linalg.column_dots(a.float(), b.float()).dtype == torch.float32
    wide = torch.randn(700, 2 * 300, generator=g, dtype=torch.float64)[:, :300]  # a column slice
    assert linalg.inner(wide, b) == pytest.approx(float((wide * b).sum()), rel=1e-12)
