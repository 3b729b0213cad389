"""The batched CG re-fit of N:M layers (prune/nm_solve.py) against the exact per-row solve."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.prune.compensate import (
    CompensateConfig,
    LayerFit,
    _LayerStats,
    compensate,
    nm_solver,
    solve_lsq,
)


def _correlated_rows(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated, unequally scaled columns and a mean (what activations look like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    x = torch.randn(rows, features, generator=g, dtype=torch.float64) @ mix.double()
    return x * torch.logspace(-1, 1, features, dtype=torch.float64) + 0.5


def _two_of_four(outputs: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(outputs, features // 4, 4, generator=g)
    return (scores.argsort(-1) < 2).reshape(outputs, features)


@pytest.mark.parametrize("fit_bias", [True, False])
def test_cg_matches_the_exact_per_row_solve(fit_bias):
    """CG (float32 products, 50 iterations at most) on 48 rows × 32 unknowns: weights within
    1e-3 of max |w| of the per-row Cholesky solution (the float32 floor on these ill-scaled
    columns), reconstruction error within 1e-6 relative, every slot off the 2:4 support zero."""
    features, outputs = 64, 48
    x = _correlated_rows(2048, features)
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(outputs, features, generator=g, dtype=torch.float64)
    y = x @ dense.T + 0.3 + 0.05 * torch.randn(2048, outputs, generator=g, dtype=torch.float64)
    stats = _LayerStats(features, outputs, need_gram=True)
    stats.add(x, y)
    support = _two_of_four(outputs, features)
    exact_w, exact_b = solve_lsq(stats, support, 1e-3, fit_bias=fit_bias, solver="exact")
    fast_w, fast_b = solve_lsq(
        stats, support, 1e-3, fit_bias=fit_bias, solver="cg", start=dense * support
    )
    assert torch.equal(fast_w[~support], torch.zeros_like(fast_w[~support]))
    assert float((fast_w - exact_w).abs().max()) <= 1e-3 * float(exact_w.abs().max())
    assert float((fast_b - exact_b).abs().max()) <= 1e-3 * float(y.abs().max())

    def error(w, b):
        return float((x @ w.T + b - y).norm() / y.norm())

    assert error(fast_w, fast_b) == pytest.approx(error(exact_w, exact_b), rel=1e-6)
    assert error(fast_w, fast_b) < 0.8 * error(dense * support, exact_b)  # the fit did something


def test_compensate_with_cg_keeps_the_mask_and_the_exact_solution():
    """End to end through `compensate`: a masked Linear re-fitted by CG equals the exact re-fit
    (within 1e-3 of max |w|), and its masked weights stay exactly zero."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Identity(), nn.Linear(32, 24)).double()
    x = _correlated_rows(512, 32, seed=2)
    support = _two_of_four(24, 32, seed=3)
    results = {}
    for solver in ("cg", "exact"):
        pruned = copy.deepcopy(dense)
        with torch.no_grad():
            pruned[1].weight.mul_(support)
        record = compensate(
            dense,
            pruned,
            x,
            [LayerFit("1", support=support)],
            CompensateConfig("lsq", nm_solver=solver),
        )
        assert record["layers"]["1"]["solver"] == solver
        assert (pruned[1].weight.detach()[~support] == 0).all()
        results[solver] = (pruned[1].weight.detach().clone(), pruned[1].bias.detach().clone())
    scale = float(results["exact"][0].abs().max())
    torch.testing.assert_close(results["cg"][0], results["exact"][0], atol=1e-3 * scale, rtol=0)
    torch.testing.assert_close(results["cg"][1], results["exact"][1], atol=1e-3 * scale, rtol=0)


def test_auto_solver_is_exact_only_where_it_is_cheap():
    assert nm_solver(torch.ones(4, 8, dtype=torch.bool), "auto") == "exact"
    assert nm_solver(_two_of_four(3072, 508), "auto") == "exact"  # 254 weights + the bias
    assert nm_solver(_two_of_four(4, 512), "auto") == "cg"
    assert nm_solver(_two_of_four(768, 3072), "auto") == "cg"  # a ViT-B/16 mlp.fc2
    assert nm_solver(_two_of_four(768, 3072), "exact") == "exact"
    with pytest.raises(UserError, match="nm_solver must be one of"):
        CompensateConfig("lsq", nm_solver="qr")
