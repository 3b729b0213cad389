"""Pruning: what can be removed together, how it is scored, how much is cut where, and MACs.

`prune_model(model, calib, spectrum, PruneConfig(...)) -> PruneResult` is the prune stage; the
names are loaded on first use so that importing `mpdeploy.prune` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpdeploy.prune.planner import PruneConfig, PruneResult, prune_model

__all__ = ["PruneConfig", "PruneResult", "prune_model"]


def __getattr__(name: str):
    if name in __all__:
        from mpdeploy.prune import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'mpdeploy.prune' has no attribute {name!r}")
