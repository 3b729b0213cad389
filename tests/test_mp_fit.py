"""MP fit: distribution functions, the authors' conventions, noise recovery, spikes, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize

from mpdeploy.errors import UserError
from mpdeploy.mp import fit_many, fit_mp, mp_cdf, mp_density, mp_quantile, tw1_quantile
from mpdeploy.mp.fit import tw_edge_factor


@pytest.mark.parametrize(
    "prob, expected",
    # Johnstone (2001), Ann. Statist. 29, Table 1 (TW₁ percentiles), and the TW₁ median.
    [
        (0.01, -3.8954),
        (0.05, -3.1804),
        (0.10, -2.7824),
        (0.50, -1.2686),
        (0.95, 0.9793),
        (0.99, 2.0234),
    ],
)
def test_tw1_quantiles_match_published_table(prob, expected):
    assert tw1_quantile(prob) == pytest.approx(expected, abs=2e-4)


def test_tw1_quantile_used_for_the_budget_edge():
    # The brief's guess "≈ −2.09" is not the 0.2 quantile; computing it gives −2.2832.
    assert tw1_quantile(0.2) == pytest.approx(-2.2832, abs=1e-3)


@pytest.mark.parametrize("gamma", [0.05, 0.25, 0.5, 1.0])
def test_mp_cdf_is_the_integral_of_the_density(gamma):
    lo, hi = (1 - math.sqrt(gamma)) ** 2, (1 + math.sqrt(gamma)) ** 2
    for x in np.linspace(lo, hi, 7)[1:]:
        numeric, _ = integrate.quad(lambda t: mp_density(t, gamma), lo, x, limit=200)
        assert mp_cdf(x, gamma) == pytest.approx(numeric, abs=1e-7)
    u = np.linspace(0.01, 0.99, 25)
    assert np.allclose(mp_cdf(mp_quantile(u, gamma), gamma), u, atol=1e-12)


def _independent_sigma_plus(w: np.ndarray, alpha=0.25, beta=0.8) -> tuple[float, float]:
    """Reference implementation from the brief's text, sharing no code with mpdeploy.mp."""
    rows, cols = w.shape
    p, n = min(rows, cols), max(rows, cols)
    lam = np.sort(np.linalg.svd(w, compute_uv=False) ** 2 / cols)
    g = p / n
    lo, hi = (1 - math.sqrt(g)) ** 2, (1 + math.sqrt(g)) ** 2

    def cdf(x):
        return integrate.quad(
            lambda t: math.sqrt((hi - t) * (t - lo)) / (2 * math.pi * g * t), lo, x
        )[0]

    ks = range(math.floor(alpha * p), math.floor((1 - alpha) * p))
    q = np.array([optimize.brentq(lambda x, k=k: cdf(x) - k / p, lo, hi) for k in ks])
    s2 = float(q @ lam[list(ks)] / (q @ q))
    t = tw1_quantile(1 - beta)
    lam_plus = s2 * (
        (1 + math.sqrt(g)) ** 2 + t * n ** (-2 / 3) * g ** (-1 / 6) * (1 + math.sqrt(g)) ** 4 / 3
    )
    return s2, math.sqrt(cols * lam_plus)


@pytest.mark.parametrize("shape", [(24, 60), (60, 24)])
def test_fit_follows_the_authors_conventions(shape):
    w = np.random.default_rng(7).standard_normal(shape) * 0.2
    s2, sigma_plus = _independent_sigma_plus(w)
    fit = fit_mp(w)
    assert fit.sigma_sq == pytest.approx(s2, rel=1e-7)
    assert fit.sigma_plus == pytest.approx(sigma_plus, rel=1e-7)


def test_code_tw_term_shrinks_a_768x2304_edge_by_about_one_percent():
    g, n = 768 / 2304, 2304
    change = tw_edge_factor(g, n, tw1_quantile(0.2), "code") / (1 + math.sqrt(g)) ** 2 - 1
    assert -0.02 < change < -0.005
    # "paper" uses the exponent 4/3 instead of dividing (1+√γ)⁴ by 3.
    paper = tw_edge_factor(1.0, n, -1.0, "paper") - 4.0
    assert paper == pytest.approx(-(2 ** (4 / 3)) * n ** (-2 / 3))


@pytest.mark.parametrize("shape", [(128, 128), (96, 384), (384, 96), (96, 32, 3, 3)])
def test_iid_gaussian_recovers_variance_and_has_no_spikes(shape):
    variance = 0.04
    seeds = range(20)
    good = 0
    for seed in seeds:
        w = np.random.default_rng(seed).standard_normal(shape) * math.sqrt(variance)
        fit = fit_mp(w, "iid")
        rows, cols = shape[0], int(np.prod(shape[1:]))
        n, g = max(rows, cols), min(rows, cols) / max(rows, cols)
        # σ+ = √(n·v·edge): √v(√M+√N) shifted by the code's TW term (−6 % for a 128² matrix).
        tw = tw1_quantile(0.2) * n ** (-2 / 3) * g ** (-1 / 6) * (1 + math.sqrt(g)) ** 4 / 3
        expected = math.sqrt(variance * n * ((1 + math.sqrt(g)) ** 2 + tw))
        assert fit.sigma_plus == pytest.approx(expected, rel=0.03)
        assert fit.fit_error < 0.06
        good += abs(fit.noise_variance / variance - 1) <= 0.03 and fit.spike_count == 0
    assert good >= 0.9 * len(seeds)


def _planted(seed: int, strengths: list[float], rows=150, cols=300) -> np.ndarray:
    """Unit-variance noise plus a rank-k signal; strengths in units of the BBP threshold."""
    rng = np.random.default_rng(seed)
    threshold = (rows * cols) ** 0.25  # singular value of S where a spike separates from the bulk
    u = np.linalg.qr(rng.standard_normal((rows, len(strengths))))[0]
    v = np.linalg.qr(rng.standard_normal((cols, len(strengths))))[0]
    return rng.standard_normal((rows, cols)) + u @ np.diag(np.array(strengths) * threshold) @ v.T


def test_planted_signal_above_bbp_gives_exactly_k_spikes():
    counts = [fit_mp(_planted(seed, [4.0, 3.0, 2.0])).spike_count for seed in range(10)]
    assert counts == [3] * 10


def test_planted_signal_below_bbp_gives_no_spikes():
    counts = [fit_mp(_planted(seed, [0.6, 0.5])).spike_count for seed in range(10)]
    assert sum(c == 0 for c in counts) >= 9


def test_spike_diagnostics_are_consistent():
    w = _planted(3, [4.0, 3.0])
    fit = fit_mp(w)
    s = np.linalg.svd(w, compute_uv=False)
    assert fit.spike_singular_values == pytest.approx(tuple(s[:2]), rel=1e-9)
    assert fit.bulk_fraction == pytest.approx(1 - 2 / 150)
    assert fit.spike_energy_fraction == pytest.approx((s[:2] ** 2).sum() / (s**2).sum(), rel=1e-9)
    assert fit.above_edge_count >= fit.spike_count  # the β = 0.8 edge sits below the detection edge
    lam = np.sort(s**2 / w.shape[1])[::-1]
    hill = 1 + 1 / np.mean(np.log(lam[:20]) - np.log(lam[20]))
    assert fit.hill_alpha == pytest.approx(hill, rel=1e-9)


def test_heavy_tailed_matrix_fits_badly():
    w = np.random.default_rng(0).standard_cauchy((128, 256))
    assert fit_mp(w).fit_error > 0.1


def test_torch_float32_matches_numpy_float64():
    w = np.random.default_rng(1).standard_normal((64, 200))
    a, b = fit_mp(w), fit_mp(torch.from_numpy(w).float())
    assert b.sigma_plus == pytest.approx(a.sigma_plus, rel=1e-5)
    assert b.spike_count == a.spike_count


def test_fit_many_equals_fit_mp_and_keeps_order():
    rng = np.random.default_rng(2)
    weights = {
        f"l{i}": rng.standard_normal(s)
        for i, s in enumerate([(40, 80), (80, 40), (30, 30), (40, 90)])
    }
    fits = fit_many(weights, batch_size=2)
    assert list(fits) == list(weights)
    for name, w in weights.items():
        assert fits[name] == fit_mp(w, name)


matrices = st.tuples(st.integers(8, 48), st.integers(8, 48), st.integers(0, 2**31 - 1)).map(
    lambda t: np.random.default_rng(t[2]).standard_normal((t[0], t[1]))
)


@settings(max_examples=40, deadline=None)
@given(matrices)
def test_fit_is_well_formed_for_any_shape(w):
    fit = fit_mp(w)
    p = min(w.shape)
    assert 0 <= fit.spike_count <= p and 0.0 <= fit.bulk_fraction <= 1.0
    assert 0.0 <= fit.spike_energy_fraction <= 1.0 and 0.0 <= fit.fit_error <= 1.0
    assert fit.sigma_plus > 0 and fit.lambda_detect > 0 and fit.sigma_max > 0


@settings(max_examples=30, deadline=None)
@given(matrices, st.floats(1e-3, 1e3))
def test_scaling_scales_sigma_plus(w, c):
    a, b = fit_mp(w), fit_mp(c * w)
    assert b.sigma_plus == pytest.approx(c * a.sigma_plus, rel=1e-9)
    assert b.spike_count == a.spike_count


@settings(max_examples=30, deadline=None)
@given(matrices)
def test_transposition_keeps_sigma_plus_and_spikes(w):
    # The gram is always divided by in_features, so σ̂² rescales by cols/rows and σ+ is unchanged.
    a, b = fit_mp(w), fit_mp(w.T)
    rows, cols = w.shape
    assert b.sigma_sq == pytest.approx(a.sigma_sq * cols / rows, rel=1e-9)
    assert b.sigma_plus == pytest.approx(a.sigma_plus, rel=1e-9)
    assert b.noise_variance == pytest.approx(a.noise_variance, rel=1e-9)
    assert b.spike_singular_values == pytest.approx(a.spike_singular_values, rel=1e-9)


@pytest.mark.parametrize(
    "weight",
    [
        np.zeros((8, 16)),
        np.ones((1, 16)),
        np.ones((16, 1)),
        np.ones(16),
        np.full((4, 4), np.nan),
        np.eye(2),
        np.random.default_rng(0).standard_normal((3, 2)),
        np.outer(np.arange(1, 9), np.arange(1, 17)),
    ],
    ids=["zero", "one-row", "one-column", "vector", "nan", "2x2", "3x2", "rank-1"],
)
def test_degenerate_inputs_name_the_layer(weight):
    with pytest.raises(UserError, match="blocks.3.mlp.fc2"):
        fit_mp(weight, "blocks.3.mlp.fc2")


@settings(max_examples=20, deadline=None)
@given(matrices, st.sampled_from([np.inf, -np.inf, np.nan]), st.data())
def test_non_finite_entries_are_user_errors(w, bad, data):
    i = data.draw(st.integers(0, w.shape[0] - 1))
    j = data.draw(st.integers(0, w.shape[1] - 1))
    w[i, j] = bad
    with pytest.raises(UserError, match="'head'.*NaN or Inf"):
        fit_mp(w, "head")


def test_bad_settings_are_user_errors():
    w = np.ones((4, 4)) + np.eye(4)
    with pytest.raises(UserError, match="tw_term"):
        fit_mp(w, tw_term="exact")
    with pytest.raises(UserError, match="alpha"):
        fit_mp(w, alpha=0.6)
