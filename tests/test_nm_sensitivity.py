"""scripts/nm_sensitivity.py: one row per eligible layer, each scored against an independent
by-hand 2:4 magnitude projection of that layer alone."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import nm_sensitivity  # noqa: E402


def _by_hand_2of4(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(weight.shape)


def test_each_layer_alone_is_scored_and_the_worst_comes_first():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)
    )
    images = torch.randn(40, 8)
    rows = nm_sensitivity.layer_sensitivity(model, images, images, 2, 4, "magnitude")
    assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)
    assert {r["layer"] for r in rows} == {"0", "2", "4"}  # a bare Sequential has no classifier
    dense = model(images).detach()
    for row in rows:
        hybrid = copy.deepcopy(model)
        layer = hybrid.get_submodule(row["layer"])
        with torch.no_grad():
            layer.weight.copy_(_by_hand_2of4(layer.weight))
            out = hybrid(images)
        kl = F.kl_div(
            F.log_softmax(out, -1), F.log_softmax(dense, -1), log_target=True, reduction="batchmean"
        )
        assert abs(row["kl"] - float(kl)) < 1e-6 and row["kl"] > 0
        agree = float((out.argmax(-1) == dense.argmax(-1)).float().mean())
        assert row["agreement"] == agree
    assert abs(sum(r["mac_share"] for r in rows) - 1.0) < 1e-9
