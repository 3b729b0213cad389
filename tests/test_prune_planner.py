"""Criteria and planner: scores mean what they claim, MAC targets are met, plans are sound."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_prune_fixtures import input_size, make_model

from mpdeploy.errors import UserError
from mpdeploy.families import get_family
from mpdeploy.models.spec import ModelSpec
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.criteria import (
    CRITERIA,
    MPAbsoluteCriterion,
    MPCriterion,
    ScoringContext,
    TaylorCriterion,
)
from mpdeploy.prune.macs import count_macs
from mpdeploy.prune.planner import MIN_CHANNELS

HEADLINE_KEYS = {
    "pruned_macs",
    "dense_macs",
    "mac_reduction",
    "pruned_params",
    "logit_perturbation_max",
    "logit_perturbation_median",
    "certified_fraction",
    "top1_agreement_calib",
}


@pytest.fixture(scope="module")
def demo():
    model = make_model("mpdeploy_demo_vit", {})
    torch.manual_seed(5)
    calib = torch.randn(16, 3, 32, 32)
    return model, calib


def consumer_inputs(model, module_name, calib):
    captured = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0].detach())
    )
    with torch.no_grad():
        model(calib)
    handle.remove()
    return torch.cat(captured)


def test_absolute_mp_score_is_the_units_output_energy_over_the_budget_weight(demo):
    # The residual-normalised default is checked by hand in test_prune_criteria.py.
    model, calib = demo
    groups = get_family(model).channel_groups(model)
    weights = {"blocks.1.attn.proj": 2.0, "blocks.1.mlp.fc2": 0.5}
    scores = MPAbsoluteCriterion().unit_scores(
        model, groups, ScoringContext(calib, weights, batch_size=5)
    )
    proj, fc2 = model.blocks[1].attn.proj, model.blocks[1].mlp.fc2
    h = consumer_inputs(model, "blocks.1.attn.proj", calib).reshape(-1, proj.in_features)
    head_dim = model.blocks[1].attn.head_dim
    for head in range(model.blocks[1].attn.num_heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        energy = (
            (h[:, cols] @ proj.weight.detach()[:, cols].T).pow(2).sum(1).mean()
        )  # E‖W[:, u] h_u‖²
        assert scores["blocks.1.attn"][head] == pytest.approx(float(energy) / 2.0, rel=1e-6)
    h = consumer_inputs(model, "blocks.1.mlp.fc2", calib).reshape(-1, fc2.in_features)
    energy = h.pow(2).mean(0) * fc2.weight.detach().pow(2).sum(0)
    np.testing.assert_allclose(scores["blocks.1.mlp"], energy.double().numpy() / 0.5, rtol=1e-5)


def test_mp_score_of_a_3x3_conv_channel_is_its_output_energy():
    model = make_model("test_resnet", {})
    groups = [g for g in get_family(model).channel_groups(model) if g.name == "layer1.0.conv1"]
    calib = torch.randn(2, *input_size(model))
    ctx = ScoringContext(calib, {}, max_rows=10**9)
    scores = MPCriterion().unit_scores(model, groups, ctx)["layer1.0.conv1"]
    conv2 = model.layer1[0].conv2
    h = consumer_inputs(model, "layer1.0.conv2", calib)
    for channel in (0, 7):
        only = torch.zeros_like(h)
        only[:, channel] = h[:, channel]
        out = torch.nn.functional.conv2d(
            only, conv2.weight.detach(), None, conv2.stride, conv2.padding
        )
        energy = out.pow(2).sum(1).mean()  # mean over images and output positions
        assert scores[channel] == pytest.approx(float(energy), rel=1e-5)


def test_taylor_scores_are_finite_and_not_all_equal(demo):
    model, calib = demo
    groups = get_family(model).channel_groups(model)
    scores = TaylorCriterion().unit_scores(model, groups, ScoringContext(calib, {}))
    for group in groups:
        assert scores[group.name].shape == (group.units,)
        assert np.isfinite(scores[group.name]).all() and scores[group.name].std() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_prune_model_reaches_the_mac_target_with_rounded_widths(demo, method):
    model, calib = demo
    before = copy.deepcopy(model.state_dict())
    spec = ModelSpec(timm_name="mpdeploy_demo_vit", num_classes=10, img_size=32)
    result = prune_model(
        model, calib, None, PruneConfig(0.5, method=method), spec=spec, input_shape=(3, 32, 32)
    )
    # the dense model is left untouched (the pipeline still needs it as teacher)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dense = count_macs(model, (1, 3, 32, 32)).total_macs
    pruned = count_macs(result.model, (1, 3, 32, 32)).total_macs
    assert abs((1 - pruned / dense) - 0.5) <= 0.01
    assert result.headline["pruned_macs"] == pruned and result.headline["dense_macs"] == dense
    assert set(result.headline) >= HEADLINE_KEYS
    widths = result.spec.widths
    for group in get_family(model).channel_groups(model):
        kept = widths[group.name]
        if group.kind == "attn_heads":
            assert kept % group.unit == 0 and kept >= group.unit
        else:
            assert kept % 8 == 0 and kept >= MIN_CHANNELS
    json.dumps(result.plan)  # plan.json is JSON-able
    records = {g["name"]: g for g in result.plan["groups"]}
    assert {k: r["width_after"] for k, r in records.items()} == widths
    assert result.plan["totals"]["within_tolerance"]


def test_random_is_seeded(demo):
    model, calib = demo
    runs = [
        prune_model(model, calib, None, PruneConfig(0.3, method="random", seed=s))
        for s in (1, 1, 2)
    ]
    assert runs[0].spec is None  # no spec given, none returned
    plans = [run.plan for run in runs]
    removed = [[g["units_removed"] for g in p["groups"]] for p in plans]
    assert removed[0] == removed[1] != removed[2]


def test_mp_uses_the_spectrum_budget_weights(demo):
    model, calib = demo
    from mpdeploy.spectrum import analyze_model

    report = analyze_model(model, sparsity=0.5)
    result = prune_model(model, calib, report, PruneConfig(0.5))
    records = {g["name"]: g for g in result.plan["groups"]}
    assert records["blocks.0.mlp"]["budget_weight"] == report.budget_weights()["blocks.0.mlp.fc2"]
    assert result.plan["budget_weights_from"] == "spectrum"


def test_bad_inputs_are_one_line_user_errors(demo):
    model, calib = demo
    with pytest.raises(UserError, match="at least 2 calibration images"):
        prune_model(model, calib[:1], None, PruneConfig(0.5, method="mp"))
    with pytest.raises(UserError, match="unknown pruning method"):
        prune_model(model, calib, None, PruneConfig(0.5, method="l1"))
    with pytest.raises(UserError, match="out of reach"):
        prune_model(model, calib, None, PruneConfig(0.98, method="magnitude"))
    with pytest.raises(UserError, match="no family"):
        prune_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), calib, None, PruneConfig(0.5))


@pytest.mark.parametrize("name", ["test_convnext", "test_resnet"])
def test_cnn_families_reach_the_target(name):
    model = make_model(name, {"use_grn": True, "ls_init_value": None} if "convnext" in name else {})
    calib = torch.randn(4, *input_size(model))
    result = prune_model(model, calib, None, PruneConfig(0.4, method="mp", round_to=8))
    assert abs(result.headline["mac_reduction"] - 0.4) <= 0.01
    assert 0.0 <= result.headline["certified_fraction"] <= 1.0


def test_pruned_result_persists_through_its_spec(demo, tmp_path):
    from mpdeploy.models.spec import load_model, save_model

    model, calib = demo
    spec = ModelSpec(timm_name="mpdeploy_demo_vit", num_classes=10, img_size=32)
    result = prune_model(model, calib, None, PruneConfig(0.3, method="magnitude"), spec=spec)
    save_model(result.model, result.spec, tmp_path)
    loaded, loaded_spec = load_model(tmp_path)
    assert loaded_spec.widths == result.spec.widths
    with torch.no_grad():
        assert torch.equal(loaded(calib), result.model(calib))
