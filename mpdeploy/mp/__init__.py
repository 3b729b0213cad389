"""Random-matrix analysis of weight matrices: MP bulk fits and the layer budgets derived from them.

Matrices only: nothing here knows about models or layers beyond a name and a shape.
"""

from mpdeploy.mp.budget import (
    REGIMES,
    BudgetConfig,
    budget_config,
    layer_budget_weights,
    zscores,
)
from mpdeploy.mp.distributions import (
    mp_cdf,
    mp_density,
    mp_edges,
    mp_quantile,
    tw1_cdf,
    tw1_quantile,
)
from mpdeploy.mp.fit import MPFit, MPFitSettings, fit_eigenvalues, fit_many, fit_mp, tw_edge_factor

__all__ = [
    "REGIMES",
    "BudgetConfig",
    "MPFit",
    "MPFitSettings",
    "budget_config",
    "fit_eigenvalues",
    "fit_many",
    "fit_mp",
    "layer_budget_weights",
    "mp_cdf",
    "mp_density",
    "mp_edges",
    "mp_quantile",
    "tw1_cdf",
    "tw1_quantile",
    "tw_edge_factor",
    "zscores",
]
