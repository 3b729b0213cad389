"""ResNeXt / RegNet grouped bottlenecks: whole cardinal paths, group counts, MACs, N:M, export.

The generic exactness (random and calibration inputs), persistence and criteria tests run these
families through their `test_cases` (tests/test_prune_surgery.py, test_prune_criteria.py); these
check what is particular to grouped convolutions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_prune_fixtures import input_size, make_model, masked_twin, relative_error

from mpdeploy.backends.onnxruntime import make_session
from mpdeploy.export import INPUT_NAME, export_onnx
from mpdeploy.families import get_family, registered_families
from mpdeploy.families.surgery import group_widths, prune_groups
from mpdeploy.models.spec import ModelSpec, load_model, save_model
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.criteria import CRITERIA, ScoringContext, get_criterion
from mpdeploy.prune.layout import layer_layouts
from mpdeploy.prune.macs import count_macs
from mpdeploy.prune.permute import why_not_permutable
from mpdeploy.prune.planner import estimate_unit_macs

FAMILIES = {f.name: f for f in registered_families()}
RESNEXT = FAMILIES["resnet"].test_cases[1]
REGNETY = FAMILIES["regnet"].test_cases[0]


@pytest.fixture(scope="module")
def resnext():
    return make_model(*RESNEXT)


@pytest.fixture(scope="module")
def regnety():
    return make_model(*REGNETY)


def groups_by_name(model):
    return {g.name: g for g in get_family(model).channel_groups(model)}


def keep_paths(group, paths):
    return [p * group.unit + c for p in paths for c in range(group.unit)]


def test_a_grouped_bottleneck_is_one_group_of_whole_cardinal_paths(resnext, regnety):
    groups = groups_by_name(resnext)
    assert list(groups) == [f"layer{i}.0.conv2" for i in range(1, 5)]  # no conv1 group
    g = groups["layer3.0.conv2"]
    conv2 = resnext.layer3[0].conv2
    assert (g.kind, g.width, g.unit, g.units) == ("conv_groups", 128, 32, conv2.groups)
    assert {(p.name, p.dim) for p in g.producers} >= {
        ("layer3.0.conv1.weight", 0),
        ("layer3.0.bn1.running_var", 0),
        ("layer3.0.conv2.weight", 0),
        ("layer3.0.bn2.bias", 0),
    }
    assert [(p.name, p.dim) for p in g.consumers] == [("layer3.0.conv3.weight", 1)]
    se = groups_by_name(regnety)["s3.b1.conv2.conv"]
    assert ("s3.b1.se.fc2.bias", 0) in {(p.name, p.dim) for p in se.producers}
    assert ("s3.b1.se.fc1.weight", 1) in {(p.name, p.dim) for p in se.consumers}
    assert se.unit == 8 and se.min_units == 1


def test_cutting_paths_lowers_the_group_count_and_keeps_the_kept_filters(regnety):
    group = groups_by_name(regnety)["s3.b1.conv2.conv"]
    dense = regnety.s3.b1
    paths = [0, 5, 18]  # of 19 groups of 8
    pruned = prune_groups(copy.deepcopy(regnety), {group.name: keep_paths(group, paths)})
    block = pruned.s3.b1
    conv2 = block.conv2.conv
    assert (conv2.groups, conv2.in_channels, conv2.out_channels) == (3, 24, 24)
    assert tuple(conv2.weight.shape) == (24, 8, 3, 3)  # per-group inputs untouched
    rows = torch.tensor(keep_paths(group, paths))
    assert torch.equal(conv2.weight, dense.conv2.conv.weight[rows])
    assert torch.equal(block.conv1.conv.weight, dense.conv1.conv.weight[rows])
    assert torch.equal(block.conv3.conv.weight, dense.conv3.conv.weight[:, rows])
    assert torch.equal(block.se.fc1.weight, dense.se.fc1.weight[:, rows])
    assert block.conv2.bn.num_features == 24 and block.se.fc2.out_channels == 24
    x = torch.randn(2, *input_size(regnety))
    keep = {g.name: range(g.width) for g in get_family(regnety).channel_groups(regnety)}
    twin = masked_twin(regnety, {**keep, group.name: rows})
    with torch.no_grad():
        assert relative_error(twin(x), pruned(x)) <= 1e-5


def test_a_block_cut_to_one_group_stays_cardinal_and_reloads(tmp_path, resnext):
    group = groups_by_name(resnext)["layer2.0.conv2"]
    pruned = prune_groups(copy.deepcopy(resnext), {group.name: keep_paths(group, [2])})
    assert pruned.layer2[0].conv2.groups == 1  # a dense conv now, but the same group
    assert list(groups_by_name(pruned)) == list(groups_by_name(resnext))
    name, kwargs = RESNEXT
    spec = ModelSpec(
        timm_name=name,
        num_classes=resnext.num_classes,
        img_size=input_size(resnext)[-1],
        model_kwargs=kwargs,
        widths=group_widths(pruned),
    )
    save_model(pruned, spec, tmp_path)
    loaded, _ = load_model(tmp_path)
    x = torch.randn(2, *input_size(resnext))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_unit_mac_estimate_is_the_measured_cost_of_one_path(regnety):
    shape = (1, *input_size(regnety))
    dense = count_macs(regnety, shape)
    group = groups_by_name(regnety)["s2.b1.conv2.conv"]
    estimate = estimate_unit_macs(regnety, [group], get_family(regnety), dense)[group.name]
    pruned = prune_groups(copy.deepcopy(regnety), {group.name: range(group.unit, group.width)})
    measured = dense.total_macs - count_macs(pruned, shape).total_macs
    assert measured == pytest.approx(estimate, rel=1e-9)  # conv1 rows, conv2 group, SE, conv3


def test_every_criterion_scores_every_path(regnety):
    torch.manual_seed(0)
    calib = torch.randn(4, *input_size(regnety))
    groups = get_family(regnety).channel_groups(regnety)
    ctx = ScoringContext(calib, {}, unit_macs={g.name: 1.0 for g in groups})
    for method in CRITERIA:
        scores = get_criterion(method).unit_scores(regnety, groups, ctx)
        for g in groups:
            assert scores[g.name].shape == (g.units,), (method, g.name)
            assert np.isfinite(scores[g.name]).all() and scores[g.name].max() > 0, method


def test_mp_pruning_reaches_its_mac_target_on_a_resnext(resnext):
    # a quarter: the tiny ResNeXt's stem, shortcuts and classifier hold most of its MACs
    torch.manual_seed(0)
    calib = torch.randn(4, *input_size(resnext))
    result = prune_model(resnext, calib, None, PruneConfig(target_macs=0.25))
    assert result.plan["family"] == "resnet"
    assert abs(result.headline["mac_reduction"] - 0.25) <= 0.01
    for dense, block in zip(resnext.children(), result.model.children(), strict=True):
        if isinstance(dense, torch.nn.Sequential):  # layer1..4
            conv2, dense_conv2 = block[0].conv2, dense[0].conv2
            # per-group inputs as dense: only the group count can fall
            assert conv2.weight.shape[1] == dense_conv2.weight.shape[1]
            assert conv2.out_channels == conv2.groups * conv2.weight.shape[1]
    assert (
        result.headline["pruned_macs"]
        == count_macs(result.model, (1, *input_size(resnext))).total_macs
    )


def test_grouped_convs_are_not_nm_eligible_and_get_no_permutation(regnety):
    layouts = {lay.name: lay for lay in layer_layouts(regnety, 4)}
    assert not layouts["s3.b1.conv2.conv"].eligible
    assert "grouped" in layouts["s3.b1.conv2.conv"].reason
    assert layouts["s3.b1.conv1.conv"].eligible and layouts["s3.b1.conv3.conv"].eligible
    eligible = {name: lay.eligible for name, lay in layouts.items()}
    group = groups_by_name(regnety)["s3.b1.conv2.conv"]
    assert "no exact fold" in why_not_permutable(group, 4, eligible)


def test_pruned_resnext_exports_and_matches_onnx_runtime(tmp_path, resnext):
    groups = get_family(resnext).channel_groups(resnext)
    keep = {g.name: keep_paths(g, range(0, g.units, 2)) for g in groups}
    pruned = prune_groups(copy.deepcopy(resnext), keep)
    assert pruned.layer3[0].conv2.groups == 2
    shape = input_size(resnext)
    export_onnx(pruned, tmp_path / "model.onnx", shape)
    session = make_session(tmp_path / "model.onnx")
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = pruned(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
