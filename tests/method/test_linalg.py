"""The pure math, without mergekit or transformers."""

import torch

from mergekit_com.method import linalg
from mergekit_com.method.parameters import SolveSettings
from mergekit_com.method.strategies import RegMeanObjective


def solve(stats, experts, weights, targets, alpha, ridge):
    settings = SolveSettings(alpha=alpha, ridge=ridge, weights=tuple(weights))
    return RegMeanObjective().solve(stats, experts, targets, settings, name="test")


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
