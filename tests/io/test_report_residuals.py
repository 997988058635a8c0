"""The merge report's residual sums, without a merge."""

import torch

from mergekit_com.io.report import MergeReport


def test_a_residual_from_the_solves_gram_product_is_the_one_it_forms_itself():
    """``tr(W G W^T)`` handed over by the solve, or formed from ``G``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 9, generator=g, dtype=torch.float64)
    gram = x.T @ x / 50
    target = torch.randn(4, 9, generator=g, dtype=torch.float64)
    merged = target + 0.1 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    sums = []
    for norm in (None, float((target @ gram * target).sum())):
        report = MergeReport(["a"], {})
        report.add_residual("layer", "q_proj", 0, gram, target, merged, norm)
        sums.append(report.layer_state("layer")["residual"]["q_proj"][0])
    want_num = ((x @ (merged - target).T).square().sum() / 50).item()
    want_den = ((x @ target.T).square().sum() / 50).item()
    for num, den, _ in sums:
        assert abs(num - want_num) < 1e-5 * want_num and abs(den - want_den) < 1e-5 * want_den
