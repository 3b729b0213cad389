"""MAC accounting: the brief's ViT-B/16 figures, measured vs analytic counts, k:n arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpdeploy.models  # noqa: F401  (makes timm importable)
from mpdeploy.errors import UserError
from mpdeploy.prune.macs import (
    count_macs,
    mac_reduction,
    sparse_execution_macs,
    theoretical_speedup,
    vit_tome_macs,
)


def test_vit_b16_figures_of_the_brief():
    dense = vit_tome_macs(depth=12, dim=768, tokens=197)
    sparse = vit_tome_macs(depth=12, dim=768, tokens=197, r=8, keep_fraction=0.5)
    tome = vit_tome_macs(depth=12, dim=768, tokens=197, r=8)
    assert dense.total / 1e9 == pytest.approx(17.5638, abs=5e-5)
    assert sparse.total / 1e9 == pytest.approx(7.0594, abs=5e-5)
    assert mac_reduction(dense.total, sparse.total) == pytest.approx(0.59807, abs=5e-6)
    assert mac_reduction(dense.total, tome.total) == pytest.approx(0.2281, abs=5e-5)
    assert theoretical_speedup(mac_reduction(dense.total, sparse.total)) == pytest.approx(
        2.49, abs=5e-3
    )
    assert sparse.tokens_per_block == tuple(197 - 8 * layer for layer in range(12))


def test_sparse_execution_macs_is_the_2_4_share_of_eligible_macs():
    dense = vit_tome_macs(depth=12, dim=768, tokens=197)
    sparse = sparse_execution_macs(dense.total, dense.block_linear, 2, 4)
    assert sparse == pytest.approx(vit_tome_macs(12, 768, 197, keep_fraction=0.5).total)
    assert sparse_execution_macs(100.0, 60.0, 6, 12) == 70.0
    with pytest.raises(UserError):
        sparse_execution_macs(100.0, 60.0, 5, 4)
    with pytest.raises(UserError):
        sparse_execution_macs(100.0, 160.0, 2, 4)


def test_count_macs_of_timm_vit_b16_matches_the_analytic_model():
    import timm

    with torch.device("meta"):  # shapes are all the counter needs; no 86M-parameter init
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    measured = count_macs(model, (1, 3, 224, 224))
    analytic = vit_tome_macs(depth=12, dim=768, tokens=197)
    assert measured.total_macs == pytest.approx(analytic.total, rel=0.01)
    blocks = [layer.name for layer in measured.layers if layer.name.startswith("blocks.")]
    assert len(measured.layers) == 50 and len(blocks) == 48
    assert measured.macs_of(blocks) == pytest.approx(analytic.block_linear, rel=1e-9)
    assert measured.macs_of(["patch_embed.proj"]) == analytic.patch_embed
    assert measured.macs_of(["head"]) == analytic.head


def test_count_macs_splits_layers_and_fused_attention():
    import timm

    model = timm.create_model("test_vit", pretrained=False).eval()
    measured = count_macs(model, (2, 3, 160, 160))
    cfg = dict(tokens=101, dim=64, depth=6, mlp_ratio=3.0)  # test_vit: 160/16 = 10×10 patches + cls
    attention = 2 * sum(2 * cfg["tokens"] ** 2 * cfg["dim"] for _ in range(cfg["depth"]))
    assert measured.by_kind["attention"] + measured.by_kind["matmul"] == attention
    assert sum(measured.by_kind.values()) == measured.total_macs
    analytic = vit_tome_macs(**cfg, patch_size=16)
    assert measured.total_macs == pytest.approx(2 * analytic.total, rel=1e-9)


def test_count_macs_of_a_small_conv_net_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )
    measured = count_macs(model, (1, 3, 6, 6))
    conv, linear = 8 * 6 * 6 * 3 * 3 * 3, 8 * 6 * 6 * 5
    assert {layer.name: layer.macs for layer in measured.layers} == {"0": conv, "3": linear}
    assert measured.by_kind == {"linear": linear, "conv": conv, "attention": 0, "matmul": 0}
    with pytest.raises(UserError, match="no MAC record"):
        measured.macs_of(["7"])
