"""Spectral Edge Budgeting: per-layer pruning-budget weights from z-scored MP signals (§2.3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from mpdeploy.errors import UserError
from mpdeploy.mp.fit import MPFit

LAYER_TYPES = ("attn", "mlp", "other")
SIGNALS = ("sigma_plus", "hill_alpha")


@dataclass(frozen=True)
class BudgetConfig:
    """How budget weights w = max(floor, 1 + β·(1 − s/s_d)₊·z) are formed at one sparsity.

    beta applies to every layer unless beta_attn / beta_mlp give a layer type its own β;
    "other" layers (patch embedding, head) keep beta.
    """

    signal: str
    beta: float
    s_d: float
    beta_attn: float | None = None
    beta_mlp: float | None = None
    floor: float = 0.1

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise UserError(f"budget signal must be one of {SIGNALS}, got {self.signal!r}")
        if not self.s_d > 0.0:
            raise UserError(f"budget decay s_d must be positive, got {self.s_d}")

    def beta_for(self, layer_type: str) -> float:
        by_type = {"attn": self.beta_attn, "mlp": self.beta_mlp}.get(layer_type)
        return self.beta if by_type is None else by_type

    def decay(self, sparsity: float) -> float:
        """d(s) = (1 − s/s_d)₊ with the authors' best power p = 1."""
        return max(0.0, 1.0 - sparsity / self.s_d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The four ViT-B sweep regimes (docs/spectrum.md), keyed by their upper sparsity bound.
# For s > 0.55 the paper gives β only for attention and MLP; "other" layers get β_attn [inference].
REGIMES: tuple[tuple[float, BudgetConfig], ...] = (
    (0.20, BudgetConfig("hill_alpha", beta=0.5, s_d=0.30)),
    (0.40, BudgetConfig("sigma_plus", beta=1.0, s_d=0.50)),
    (0.55, BudgetConfig("sigma_plus", beta=1.25, s_d=0.70)),
    (1.00, BudgetConfig("sigma_plus", beta=1.0, s_d=0.85, beta_attn=1.0, beta_mlp=2.0)),
)


def budget_config(
    sparsity: float, *, beta: float | None = None, s_d: float | None = None
) -> BudgetConfig:
    """The regime's config at `sparsity`; an explicit beta is uniform over all layer types."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must lie in [0, 1), got {sparsity}")
    config = next(cfg for upper, cfg in REGIMES if sparsity <= upper)
    if beta is not None:
        config = replace(config, beta=beta, beta_attn=None, beta_mlp=None)
    if s_d is not None:
        config = replace(config, s_d=s_d)
    return config


def zscores(values: Mapping[str, float | None]) -> dict[str, float]:
    """Population z-scores (np.std, as the authors); missing signals and a zero spread give 0."""
    present = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
    arr = np.array(list(present.values()), dtype=np.float64)
    mean = arr.mean() if arr.size else 0.0
    std = arr.std() if arr.size else 0.0
    if std == 0.0:
        return {k: 0.0 for k in values}
    return {k: (present[k] - mean) / std if k in present else 0.0 for k in values}


def _signal_values(signals: Mapping[str, MPFit | float], signal: str) -> dict[str, float | None]:
    return {
        name: getattr(value, signal) if isinstance(value, MPFit) else value
        for name, value in signals.items()
    }


def layer_budget_weights(
    signals: Mapping[str, MPFit] | Mapping[str, float],
    sparsity: float,
    *,
    beta: float | None = None,
    s_d: float | None = None,
    layer_types: Mapping[str, str] | None = None,
    config: BudgetConfig | None = None,
) -> dict[str, float]:
    """Budget weight per layer; a weight above 1 means the layer is pruned more.

    `signals` are MPFits (the regime picks σ+ or the Hill α) or one float per layer (used as
    is). z-scores are taken across all given layers. `layer_types` maps name → "attn" | "mlp" |
    "other" for the layer-type regime; layers it does not name count as "other".
    """
    config = config or budget_config(sparsity, beta=beta, s_d=s_d)
    layer_types = layer_types or {}
    unknown = set(layer_types.values()) - set(LAYER_TYPES)
    if unknown:
        raise UserError(f"layer types must be among {LAYER_TYPES}, got {sorted(unknown)}")
    z = zscores(_signal_values(signals, config.signal))
    decay = config.decay(sparsity)
    return {
        name: max(
            config.floor, 1.0 + config.beta_for(layer_types.get(name, "other")) * decay * z[name]
        )
        for name in signals
    }
