"""Swin V1/V2 heads with their per-head bias slices, DeiT distilled / register-token ViTs.

The generic exactness (random and calibration inputs), persistence and criteria tests run these
through the families' `test_cases` (tests/test_prune_surgery.py, test_prune_criteria.py); these
check what is particular to windowed attention and extra prefix tokens.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_prune_fixtures import input_size, make_model, relative_error

from mpdeploy.backends.onnxruntime import make_session
from mpdeploy.export import INPUT_NAME, export_onnx
from mpdeploy.families import get_family, registered_families
from mpdeploy.families.surgery import prune_groups
from mpdeploy.families.swin import PrunedWindowAttentionV2
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.criteria import CRITERIA, ScoringContext, get_criterion
from mpdeploy.prune.macs import count_macs
from mpdeploy.prune.permute import permute_groups, why_not_permutable
from mpdeploy.prune.planner import estimate_unit_macs

FAMILIES = {f.name: f for f in registered_families()}
SWIN_V1, SWIN_V2 = FAMILIES["swin"].test_cases
DEIT = next(case for case in FAMILIES["vit"].test_cases if "distilled" in case[0])


@pytest.fixture(scope="module")
def swin():
    return make_model(*SWIN_V1)


@pytest.fixture(scope="module")
def swinv2():
    return make_model(*SWIN_V2)


def groups_by_name(model):
    return {g.name: g for g in get_family(model).channel_groups(model)}


def heads(group, kept):
    return [h * group.unit + c for h in kept for c in range(group.unit)]


def test_v1_head_cut_takes_its_bias_table_column_and_leaves_windows_alone(swin):
    name = "layers.1.blocks.1.attn"  # a shifted block with 4 heads
    group = groups_by_name(swin)[name]
    assert (group.kind, group.unit, group.units) == ("attn_heads", 16, 4)
    assert [p.name for p in group.unit_params] == [f"{name}.relative_position_bias_table"]
    dense_block = swin.layers[1].blocks[1]
    pruned = prune_groups(copy.deepcopy(swin), {name: heads(group, [1, 3])})
    block = pruned.layers[1].blocks[1]
    assert block.attn.num_heads == 2 and block.attn.proj.in_features == 32
    table = dense_block.attn.relative_position_bias_table
    assert torch.equal(block.attn.relative_position_bias_table, table[:, [1, 3]])
    assert block.shift_size == dense_block.shift_size and any(block.shift_size)
    assert torch.equal(block.attn_mask, dense_block.attn_mask)


def test_v2_head_cut_takes_logit_scale_and_cpb_rows(swinv2):
    name = "layers.1.blocks.0.attn"
    group = groups_by_name(swinv2)[name]
    assert group.kind == "cosine_attn_heads"
    assert {p.name for p in group.unit_params} == {
        f"{name}.logit_scale",
        f"{name}.cpb_mlp.2.weight",
    }
    assert {f"{name}.q_bias", f"{name}.v_bias"} <= {p.name for p in group.producers}
    dense = swinv2.layers[1].blocks[0].attn
    pruned = prune_groups(copy.deepcopy(swinv2), {name: heads(group, [0, 2])})
    attn = pruned.layers[1].blocks[0].attn
    assert isinstance(attn, PrunedWindowAttentionV2) and attn.num_heads == 2
    assert torch.equal(attn.logit_scale, dense.logit_scale[[0, 2]])
    assert torch.equal(attn.cpb_mlp[2].weight, dense.cpb_mlp[2].weight[[0, 2]])
    assert torch.equal(attn.q_bias, dense.q_bias[heads(group, [0, 2])])
    # the untouched blocks keep timm's class (the swap happens only where heads were cut)
    assert type(pruned.layers[0].blocks[0].attn) is type(dense)


@pytest.mark.parametrize("case", ["v1", "v2"])
def test_head_mac_estimate_is_the_measured_cost_of_one_head(swin, swinv2, case):
    model = swin if case == "v1" else swinv2
    shape = (1, *input_size(model))
    dense = count_macs(model, shape)
    group = groups_by_name(model)["layers.0.blocks.1.attn"]
    estimate = estimate_unit_macs(model, [group], get_family(model), dense)[group.name]
    pruned = prune_groups(copy.deepcopy(model), {group.name: range(group.unit, group.width)})
    measured = dense.total_macs - count_macs(pruned, shape).total_macs
    # qkv rows, proj columns, QKᵀ and AV per window (V2: + the position-bias MLP's head row)
    assert measured == pytest.approx(estimate, rel=1e-6)


def test_every_criterion_scores_every_head_and_neuron(swinv2):
    torch.manual_seed(0)
    calib = torch.randn(3, *input_size(swinv2))
    groups = get_family(swinv2).channel_groups(swinv2)
    ctx = ScoringContext(calib, {}, unit_macs={g.name: 1.0 for g in groups})
    for method in CRITERIA:
        scores = get_criterion(method).unit_scores(swinv2, groups, ctx)
        for g in groups:
            assert scores[g.name].shape == (g.units,), (method, g.name)
            assert np.isfinite(scores[g.name]).all() and scores[g.name].max() > 0, method


def test_mp_pruning_halves_the_macs_of_a_swin(swin):
    torch.manual_seed(0)
    calib = torch.randn(4, *input_size(swin))
    result = prune_model(swin, calib, None, PruneConfig(target_macs=0.5))
    assert result.plan["family"] == "swin"
    # 0.03, not the planner's 0.01: one 16-channel head of this tiny model is ~2 % of its MACs
    assert abs(result.headline["mac_reduction"] - 0.5) <= 0.03
    assert min(b.attn.num_heads for layer in result.model.layers for b in layer.blocks) >= 1


def test_nm_permutation_inside_v1_heads_is_exact_and_v2_is_refused(swin, swinv2):
    model = copy.deepcopy(swin)
    groups = get_family(model).channel_groups(model)
    eligible = {g.consumer_module: True for g in groups}
    gen = torch.Generator().manual_seed(0)
    energy = {g.consumer_module: torch.rand(g.width, generator=gen) for g in groups}
    records = permute_groups(model, groups, energy, 4, eligible)
    assert all(r.permuted for r in records) and sum(r.moved_channels for r in records) > 0
    x = torch.randn(2, *input_size(swin))
    with torch.no_grad():
        assert relative_error(swin(x), model(x)) <= 1e-5
    v2 = groups_by_name(swinv2)["layers.0.blocks.0.attn"]
    assert "no exact fold" in why_not_permutable(v2, 4, {v2.consumer_module: True})


def test_pruned_deit_distilled_exports_and_matches_onnx_runtime(tmp_path):
    model = make_model(*DEIT)
    groups = get_family(model).channel_groups(model)
    keep = {g.name: heads(g, range(0, g.units, 2)) for g in groups}
    pruned = prune_groups(copy.deepcopy(model), keep)
    shape = input_size(model)
    export_onnx(pruned, tmp_path / "model.onnx", shape)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = pruned(x).numpy()
    got = make_session(tmp_path / "model.onnx").run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_distilled_and_register_token_vits_keep_their_prefix_tokens():
    deit = make_model(*DEIT)
    reg = make_model("test_vit", {"reg_tokens": 4})
    assert type(deit).__name__ == "VisionTransformerDistilled" and deit.num_prefix_tokens == 2
    assert reg.num_prefix_tokens == 5
    for model in (deit, reg):
        dense = count_macs(model, (1, *input_size(model)))
        group = groups_by_name(model)["blocks.0.attn"]
        estimate = estimate_unit_macs(model, [group], get_family(model), dense)[group.name]
        keep = range(group.unit, group.width)
        pruned = prune_groups(copy.deepcopy(model), {group.name: keep})
        measured = dense.total_macs - count_macs(pruned, (1, *input_size(model))).total_macs
        # the prefix tokens count in QKᵀ and AV like patch tokens do
        assert measured == pytest.approx(estimate, rel=1e-6)


def test_mp_fisher_robust_gives_each_window_its_images_photo(swin):
    """Swin's attention sees each image as several windows (rows B·nW): the photo folds are
    spread over them, so a build calibrated on photo crops prunes a Swin with mp_fisher_robust."""
    torch.manual_seed(0)
    calib = torch.randn(4, *input_size(swin))
    config = PruneConfig(target_macs=0.3, method="mp_fisher_robust")
    result = prune_model(swin, calib, None, config, groups=["a", "b", "a", "b"])
    assert result.plan["calibration"]["score_folds"] == 2
    assert abs(result.headline["mac_reduction"] - 0.3) <= 0.03


def test_mp_fisher_split_weighs_each_window_by_its_images_strata(swin):
    """Swin's attention sees each image as several windows (rows B·nW): the two strata's
    per-image weights must be spread over an image's windows (a weight per image against a row
    per window would not broadcast), and a build prunes a Swin with the default criterion."""
    from mpdeploy.prune.criteria import MPFisherSplitCriterion

    torch.manual_seed(0)
    calib = torch.randn(4, *input_size(swin))
    groups = get_family(swin).channel_groups(swin)
    windowed = [g for g in groups if g.kind == "attn_heads"]
    assert windowed
    ctx = ScoringContext(calib, {}, batch_size=2)
    scores = MPFisherSplitCriterion().unit_scores(swin, groups, ctx)
    assert all(np.isfinite(scores[g.name]).all() and (scores[g.name] >= 0).all() for g in groups)
    assert any(scores[g.name].max() > 0 for g in windowed)
    result = prune_model(swin, calib, None, PruneConfig(target_macs=0.3, method="mp_fisher_split"))
    assert result.plan["calibration"]["score_draws"] == 2
    assert abs(result.headline["mac_reduction"] - 0.3) <= 0.03
