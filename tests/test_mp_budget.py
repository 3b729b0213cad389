"""SEB layer budget weights: formula, floor, regimes, layer types, signal choice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpdeploy.errors import UserError
from mpdeploy.mp import budget_config, fit_mp, layer_budget_weights

SIGNALS = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 10.0}


def _z(values):
    arr = np.array(list(values))
    return (arr - arr.mean()) / arr.std()  # population std, as the authors' np.std


def test_formula_at_a_sigma_plus_regime():
    weights = layer_budget_weights(SIGNALS, 0.30)  # β = 1.0, s_d = 0.5
    expected = np.maximum(0.1, 1 + 1.0 * (1 - 0.30 / 0.5) * _z(SIGNALS.values()))
    assert list(weights.values()) == pytest.approx(expected.tolist(), rel=1e-12)
    assert list(weights) == list(SIGNALS)


def test_beta_zero_is_plain_magnitude():
    for s in (0.1, 0.3, 0.5, 0.7):
        assert set(layer_budget_weights(SIGNALS, s, beta=0.0).values()) == {1.0}


def test_no_decay_beyond_s_d():
    assert set(layer_budget_weights(SIGNALS, 0.35, s_d=0.3).values()) == {1.0}


def test_floor_is_point_one():
    weights = layer_budget_weights(
        {"big": 100.0, **{f"x{i}": 0.0 for i in range(9)}}, 0.3, beta=50.0
    )
    assert min(weights.values()) == 0.1 and weights["big"] > 1


@pytest.mark.parametrize(
    "s, signal, beta, s_d",
    [
        (0.05, "hill_alpha", 0.5, 0.30),
        (0.20, "hill_alpha", 0.5, 0.30),
        (0.21, "sigma_plus", 1.0, 0.50),
        (0.40, "sigma_plus", 1.0, 0.50),
        (0.45, "sigma_plus", 1.25, 0.70),
        (0.55, "sigma_plus", 1.25, 0.70),
        (0.60, "sigma_plus", 1.0, 0.85),
    ],
)
def test_regimes(s, signal, beta, s_d):
    config = budget_config(s)
    assert (config.signal, config.beta, config.s_d) == (signal, beta, s_d)


def test_layer_type_regime_uses_separate_betas():
    types = {"a": "attn", "b": "mlp", "c": "other", "d": "mlp"}
    weights = layer_budget_weights(SIGNALS, 0.65, layer_types=types)
    z = dict(zip(SIGNALS, _z(SIGNALS.values()), strict=True))
    decay = 1 - 0.65 / 0.85
    assert weights["a"] == pytest.approx(max(0.1, 1 + 1.0 * decay * z["a"]))
    assert weights["b"] == pytest.approx(max(0.1, 1 + 2.0 * decay * z["b"]))
    assert weights["d"] == pytest.approx(1 + 2.0 * decay * z["d"])
    # An explicit β is uniform over types.
    uniform = layer_budget_weights(SIGNALS, 0.65, layer_types=types, beta=1.0)
    assert uniform["d"] == pytest.approx(1 + decay * z["d"])


def test_fits_supply_hill_alpha_at_low_and_sigma_plus_at_high_sparsity():
    rng = np.random.default_rng(0)
    fits = {f"l{i}": fit_mp(rng.standard_normal((40, 60)) * (i + 1), f"l{i}") for i in range(4)}
    low = layer_budget_weights(fits, 0.1)
    hill = _z([f.hill_alpha for f in fits.values()])
    assert list(low.values()) == pytest.approx((1 + 0.5 * (1 - 0.1 / 0.3) * hill).tolist())
    high = layer_budget_weights(fits, 0.3)
    sigma = _z([f.sigma_plus for f in fits.values()])
    assert list(high.values()) == pytest.approx(np.maximum(0.1, 1 + 0.4 * sigma).tolist())


def test_equal_signals_give_ones():
    assert set(layer_budget_weights({"a": 2.0, "b": 2.0}, 0.3).values()) == {1.0}


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="sparsity"):
        layer_budget_weights(SIGNALS, 1.2)
    with pytest.raises(UserError, match="layer types"):
        layer_budget_weights(SIGNALS, 0.6, layer_types={"a": "conv"})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.1, 100.0), min_size=2, max_size=30),
    st.floats(0.0, 0.95),
    st.floats(0.0, 3.0),
)
def test_weights_are_floored_and_ordered_like_the_signal(values, s, beta):
    signals = {f"l{i}": v for i, v in enumerate(values)}
    weights = layer_budget_weights(signals, s, beta=beta)
    assert min(weights.values()) >= 0.1
    order = sorted(signals, key=signals.get)
    ranked = [weights[n] for n in order]
    assert all(a <= b + 1e-12 for a, b in zip(ranked, ranked[1:], strict=False))
