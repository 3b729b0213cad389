"""PruneConfig(steps=k): units chosen in k re-scored steps, one cut and compensation from dense."""

from __future__ import annotations

import copy

import pytest
import torch
from test_prune_fixtures import input_size, make_model

from mpdeploy.errors import UserError
from mpdeploy.families import get_family
from mpdeploy.families.surgery import keep_indices, prune_groups
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.macs import count_macs
from mpdeploy.prune.planner import _compensate

TARGET = 0.3  # test_resnet cannot lose much more than 40 % (8-channel floors)


@pytest.fixture(scope="module", params=["test_resnet", "mpdeploy_demo_vit"])
def model_and_calib(request):
    model = make_model(request.param, {})
    torch.manual_seed(3)
    return model, torch.randn(16, *input_size(model))


def _run(model, calib, steps, compensate="none"):
    config = PruneConfig(target_macs=TARGET, method="taylor", steps=steps, compensate=compensate)
    return prune_model(model, calib, None, config, input_shape=input_size(model))


def test_two_steps_cut_the_dense_model_at_the_composed_units(model_and_calib):
    model, calib = model_and_calib
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = _run(model, calib, steps=2)
    # the final model is the dense one cut at the recorded kept units, nothing re-fitted
    groups = get_family(model).channel_groups(model)
    removed = {g["name"]: set(g["units_removed"]) for g in result.plan["groups"]}
    expected = prune_groups(copy.deepcopy(model), keep_indices(groups, removed)).state_dict()
    got = result.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # the input model is untouched, the target met in dense MACs, both steps recorded
    for key, value in model.state_dict().items():
        assert torch.equal(value, dense_state[key]), key
    dense = count_macs(model, (1, *input_size(model))).total_macs
    pruned = count_macs(result.model, (1, *input_size(model))).total_macs
    assert result.headline["mac_reduction"] == pytest.approx(1 - pruned / dense)
    assert abs(result.headline["mac_reduction"] - TARGET) <= PruneConfig(TARGET).tolerance
    assert [s["target_macs"] for s in result.plan["steps"]] == [TARGET / 2, TARGET]
    assert result.plan["steps"][1]["of_current_macs"] < TARGET
    assert {t["step"] for t in result.plan["mac_iterations"]} == {1, 2}


def test_second_step_is_scored_on_the_cut_model():
    # re-scoring changes the choice: on this ViT the taylor scores of the half-cut model pick
    # other units than one shot does
    model = make_model("mpdeploy_demo_vit", {})
    torch.manual_seed(3)
    calib = torch.randn(16, *input_size(model))
    once, twice = _run(model, calib, steps=1), _run(model, calib, steps=2)
    kept = [{g["name"]: g["units_kept"] for g in r.plan["groups"]} for r in (once, twice)]
    assert kept[0] != kept[1]
    assert "steps" not in once.plan


def test_the_final_compensation_runs_from_the_dense_model(model_and_calib):
    model, calib = model_and_calib
    result = _run(model, calib, steps=2, compensate="lsq+bn")
    groups = get_family(model).channel_groups(model)
    removed = {g["name"]: set(g["units_removed"]) for g in result.plan["groups"]}
    expected = prune_groups(copy.deepcopy(model), keep_indices(groups, removed)).eval()
    config = PruneConfig(target_macs=TARGET, method="taylor", compensate="lsq+bn")
    _compensate(model, expected, calib, groups, removed, config)
    for key, value in expected.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value), key


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2"])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(UserError, match="prune steps must be an integer ≥ 1"):
        PruneConfig(target_macs=0.5, steps=steps)
