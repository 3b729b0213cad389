"""`mp_fisher_taylor`: mp_fisher's allocation, heads chosen by the first-order Taylor order."""

from __future__ import annotations

import numpy as np
import torch
from test_prune_fixtures import input_size, make_model

from mpdeploy.families import get_family
from mpdeploy.prune import PruneConfig
from mpdeploy.prune.criteria import (
    MPFisherCriterion,
    MPFisherTaylorCriterion,
    MPTaylorCriterion,
    ScoringContext,
    TaylorCriterion,
)


def scores_of(name, kwargs, criteria, weights):
    model = make_model(name, kwargs)
    calib = torch.randn(6, *input_size(model), generator=torch.Generator().manual_seed(3))
    groups = get_family(model).channel_groups(model)
    ctx = ScoringContext(calib, weights, batch_size=3)
    return groups, [c().unit_scores(model, groups, ctx) for c in criteria]


def test_heads_follow_taylor_order_with_mp_fisher_values_and_other_groups_are_unchanged():
    weights = {"blocks.0.attn.proj": 2.0, "blocks.0.mlp.fc2": 0.5}
    groups, (hybrid, fisher, taylor) = scores_of(
        "test_vit",
        {"num_heads": 4},
        (MPFisherTaylorCriterion, MPFisherCriterion, TaylorCriterion),
        weights,
    )
    heads = [g for g in groups if g.kind == "attn_heads"]
    assert heads and all(g.units == 4 for g in heads)
    for group in groups:
        if group.kind != "attn_heads":
            np.testing.assert_array_equal(hybrid[group.name], fisher[group.name])
            continue
        # the group's score values (hence its share of the plan) are mp_fisher's ...
        np.testing.assert_array_equal(np.sort(hybrid[group.name]), np.sort(fisher[group.name]))
        # ... and the head removed first is Taylor's least important one
        assert np.array_equal(np.argsort(hybrid[group.name]), np.argsort(taylor[group.name]))


def test_a_cnn_gets_exactly_the_mp_fisher_scores():
    _, (hybrid, fisher) = scores_of(
        "test_resnet", {}, (MPFisherTaylorCriterion, MPFisherCriterion), {}
    )
    assert all(np.array_equal(hybrid[name], fisher[name]) for name in fisher)


def test_mp_taylor_divides_taylor_by_the_square_root_of_the_budget_weight():
    weights = {"blocks.0.mlp.fc2": 4.0}
    _, (mp_taylor, taylor) = scores_of(
        "test_vit", {}, (MPTaylorCriterion, TaylorCriterion), weights
    )
    np.testing.assert_allclose(mp_taylor["blocks.0.mlp"], taylor["blocks.0.mlp"] / 2.0)
    np.testing.assert_array_equal(mp_taylor["blocks.0.attn"], taylor["blocks.0.attn"])


def test_the_default_criterion_is_mp_fisher_split():
    from mpdeploy.pipeline import METHODS, BuildOptions

    assert PruneConfig(0.5).method == BuildOptions.method == METHODS[0] == "mp_fisher_split"


def test_one_forward_per_batch_gives_the_taylor_scores_of_a_taylor_pass_of_their_own():
    model = make_model("test_vit", {"num_heads": 4})
    calib = torch.randn(6, *input_size(model), generator=torch.Generator().manual_seed(3))
    groups = get_family(model).channel_groups(model)
    heads = [g for g in groups if g.kind == "attn_heads"]
    ctx = ScoringContext(calib, {}, batch_size=3)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        fisher, fused = MPFisherTaylorCriterion()._scores(model, groups, ctx, heads)
    finally:
        handle.remove()
    assert len(forwards) == 2  # 6 images in batches of 3: one forward each, two backwards
    alone = TaylorCriterion().unit_scores(model, heads, ctx)
    assert set(fused) == {g.name for g in heads}
    for g in heads:
        np.testing.assert_allclose(fused[g.name], alone[g.name], rtol=1e-12, atol=0)
    reference = MPFisherCriterion().unit_scores(model, groups, ctx)
    assert all(np.array_equal(fisher[name], reference[name]) for name in reference)
