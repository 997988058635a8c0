"""Statistics of a shared input: padding never counts, a bias is a ones column, and too
few tokens are reported once per expert."""

import logging

import pytest
import torch

from mergekit_com.method import linalg
from mergekit_com.method.statistics import GroupStatistics, TokenRows


def test_means_over_valid_tokens_with_a_ones_column_for_a_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    z = torch.randn(2, 5, 3)
    stats = GroupStatistics(["a"], biased=True, cross=True)
    stats.add("a", x, TokenRows.of(valid), z)
    rows = torch.cat([x[valid], torch.ones(8, 1)], dim=1).double()
    zrows = torch.cat([z[valid], torch.ones(8, 1)], dim=1).double()
    got = stats.finish("layer 0 q", set())
    torch.testing.assert_close(got.grams["a"], rows.T @ rows / 8)
    torch.testing.assert_close(got.crosses["a"], rows.T @ zrows / 8)


@pytest.mark.parametrize("held_out", [False, True])
def test_targets_by_outputs_are_the_cross_moment_times_the_weights(held_out):
    """A group with fewer outputs than inputs keeps ``X^T Y`` per linear (``Y`` the
    linear's output on ``Z``, bias included) and ``diag(X^T Z)``: with the ones column,
    exactly ``C [W | b]^T`` and ``diag(C)`` of the cross moment ``C``, folds and all."""
    torch.manual_seed(0)
    x, z = torch.randn(2, 2, 5, 6), torch.randn(2, 2, 5, 6)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w, b = torch.randn(2, 6), torch.randn(2)
    both = {}
    for by_outputs in (False, True):
        stats = GroupStatistics(["a"], biased=True, cross=True, held_out=held_out, by_outputs=by_outputs)
        for i in range(2):
            tokens = TokenRows.of(valid, first=i)
            # the outputs as the walk's pass hands them over: their tokens' rows, as taken
            y = stats.output_rows(tokens)(z[i] @ w.T + b)
            stats.add("a", x[i], tokens, z[i], {"w": y})
        both[by_outputs] = stats.finish("layer 0 down", set())
    cross, kept = both[False], both[True]
    augmented = torch.cat([w, b[:, None]], 1).double()
    assert not kept.crosses and not cross.outputs
    for plain, outputs in [(cross, kept)] + list(zip(cross.folds, kept.folds)):
        torch.testing.assert_close(outputs.outputs["a"]["w"], plain.crosses["a"] @ augmented.T)
        torch.testing.assert_close(outputs.cross_diags["a"], plain.crosses["a"].diagonal())
        torch.testing.assert_close(outputs.grams["a"], plain.grams["a"])
    assert len(kept.folds) == (2 if held_out else 0)
    with pytest.raises(ValueError, match="need the linears' outputs"):
        GroupStatistics(["a"], biased=False, cross=True, by_outputs=True).add(
            "a", x[0], TokenRows.of(valid), z[0])


def test_too_few_tokens_are_reported_once_per_expert(caplog):
    warned = set()
    for layer in range(3):
        stats = GroupStatistics(["a", "b"], biased=False, cross=False)
        stats.add("a", torch.randn(1, 2, 8), TokenRows.of(torch.ones(1, 2)))  # 2 < 8
        stats.add("b", torch.randn(1, 20, 8), TokenRows.of(torch.ones(1, 20)))
        with caplog.at_level(logging.WARNING):
            stats.finish(f"layer {layer} q", warned)
    lines = [r.getMessage() for r in caplog.records if "rank-deficient" in r.getMessage()]
    assert lines == ["model a: 2 calibration tokens for 8 input features (layer 0 q): the Gram is "
                     "rank-deficient, so shrinkage and the ridge decide what the data cannot; "
                     "expect a weaker merge (on our zoos, under 1 token per input feature cost the "
                     "default merge 6-35 points of normalized accuracy; from 4 tokens per feature "
                     "it was within 3 points of its best); give more calibration data"]


def test_token_rows_follow_any_mask_in_sequence_order():
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]])  # left padding, holes
    tokens = TokenRows.of(valid)
    assert tokens.sequences.lengths == (2, 4, 2)
    torch.testing.assert_close(tokens.take(x, biased=False), x[valid.bool()], rtol=0, atol=0)
    assert tokens.take(x.float(), biased=True)[:, -1].eq(1).all()


def test_held_out_folds_alternate_whole_sequences_from_the_batch_index():
    torch.manual_seed(0)
    x0, x1 = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(1, 4, 2, dtype=torch.float64)
    valid0 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    valid1 = torch.ones(1, 4)
    mo = linalg.Moments.held_out_pair(track_spread=True)
    # batch 0: its sequences to folds 0, 1, 0; batch 1: its first sequence to fold 1
    for x, valid, first in ((x0, valid0, 0), (x1, valid1, 1)):
        tokens = TokenRows.of(valid, first).held_out
        mo.add(tokens.take(x, biased=False), sequences=tokens.sequences)
    even = torch.cat([x0[0, :2], x0[2, :1]])  # fold 0
    odd = torch.cat([x0[1, :3], x1[0]])  # fold 1
    torch.testing.assert_close(mo.folds[0].gram, even.T @ even)
    torch.testing.assert_close(mo.folds[1].gram, odd.T @ odd)
    mo.sum_folds()  # the totals, once every batch is in
    rows = torch.cat([x0[valid0.bool()], x1[0]])
    torch.testing.assert_close(mo.gram, rows.T @ rows)
    assert (mo.count, mo.folds[0].count, mo.folds[1].count, mo.sequences) == (10, 3, 7, 4)
    whole = linalg.Moments(track_spread=True)
    for x, valid in ((x0, valid0), (x1, valid1)):
        tokens = TokenRows.of(valid)
        whole.add(tokens.take(x, biased=False), sequences=tokens.sequences)
    assert abs(mo.spread - whole.spread) <= 1e-12 * whole.spread  # fold order: the same sequences


def test_held_out_moments_need_their_rows_fold_by_fold():
    mo = linalg.Moments.held_out_pair()
    with pytest.raises(ValueError, match="fold by fold"):
        mo.add(torch.randn(4, 2), sequences=linalg.Sequences((2, 2)))
