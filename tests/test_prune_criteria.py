"""The `mp` criterion's residual normalisation: E‖W_out[:, u] h_u‖² / E‖x_res‖² / w_ℓ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prune_fixtures import FAMILY_CASES, input_size, make_model

from mpdeploy.families import get_family
from mpdeploy.prune.criteria import (
    CRITERIA,
    MPAbsoluteCriterion,
    MPCriterion,
    ScoringContext,
)


def module_inputs(model, names, calib):
    """The inputs of each named module over one forward of `calib` (forward pre-hooks)."""
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, inputs, name=name: captured[name].append(inputs[0].detach())
        )
        for name in names
    ]
    with torch.no_grad():
        model(calib)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def test_residual_modules_are_the_block_inputs():
    vit = make_model("test_vit", {})
    names = {g.name: g.residual_module for g in get_family(vit).channel_groups(vit)}
    assert names["blocks.0.attn"] == "blocks.0.norm1"
    assert names["blocks.0.mlp"] == "blocks.0.norm2"
    convnext = make_model("test_convnext", {})
    group = get_family(convnext).channel_groups(convnext)[0]
    assert group.residual_module == "stages.0.blocks.0.conv_dw"


def test_mp_divides_the_output_energy_by_the_residual_energy_by_hand():
    model = make_model("test_vit", {})
    torch.manual_seed(3)
    calib = torch.randn(6, *input_size(model))
    groups = get_family(model).channel_groups(model)
    weights = {"blocks.1.mlp.fc2": 0.5, "blocks.1.attn.proj": 2.0}
    ctx = ScoringContext(calib, weights, batch_size=4)  # two batches: the averages must combine
    scores = MPCriterion().unit_scores(model, groups, ctx)
    absolute = MPAbsoluteCriterion().unit_scores(model, groups, ctx)
    seen = module_inputs(
        model, ["blocks.1.norm1", "blocks.1.norm2", "blocks.1.mlp.fc2", "blocks.1.attn.proj"], calib
    )
    # E‖x_res‖²: squared norm of each token's residual vector, mean over images and tokens
    res_attn = seen["blocks.1.norm1"].double().pow(2).sum(-1).mean()
    res_mlp = seen["blocks.1.norm2"].double().pow(2).sum(-1).mean()
    assert not torch.isclose(res_attn, res_mlp)  # the two groups really use different streams
    fc2 = model.blocks[1].mlp.fc2
    h = seen["blocks.1.mlp.fc2"].double().reshape(-1, fc2.in_features)
    energy = h.pow(2).mean(0) * fc2.weight.detach().double().pow(2).sum(0)  # E‖W[:, u] h_u‖²
    expected = energy / res_mlp / 0.5
    np.testing.assert_allclose(scores["blocks.1.mlp"], expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(absolute["blocks.1.mlp"], (energy / 0.5).numpy(), rtol=1e-6)
    proj, attn = model.blocks[1].attn.proj, model.blocks[1].attn
    h = seen["blocks.1.attn.proj"].double().reshape(-1, proj.in_features)
    for head in (0, attn.num_heads - 1):
        cols = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
        energy = (h[:, cols] @ proj.weight.detach().double()[:, cols].T).pow(2).sum(1).mean()
        assert scores["blocks.1.attn"][head] == pytest.approx(
            float(energy / res_attn / 2.0), rel=1e-6
        )


def test_convnext_residual_energy_is_per_spatial_position():
    model = make_model("test_convnext", {"conv_mlp": True})
    calib = torch.randn(3, *input_size(model))
    groups = get_family(model).channel_groups(model)[2:3]
    ctx = ScoringContext(calib, {}, max_rows=10**9)
    scores = MPCriterion().unit_scores(model, groups, ctx)[groups[0].name]
    absolute = MPAbsoluteCriterion().unit_scores(model, groups, ctx)[groups[0].name]
    name = groups[0].residual_module
    x = module_inputs(model, [name], calib)[name].double()  # (B, C, H, W)
    residual = float(x.pow(2).sum(1).mean())  # sum over channels, mean over images and positions
    np.testing.assert_allclose(scores, absolute / residual, rtol=1e-9)


def test_resnet_groups_are_not_residual_normalised():
    model = make_model("test_resnet", {})
    groups = get_family(model).channel_groups(model)
    assert all(g.residual_module is None for g in groups)
    calib = torch.randn(3, *input_size(model))
    ctx = ScoringContext(calib, {})
    scores = MPCriterion().unit_scores(model, groups, ctx)
    absolute = MPAbsoluteCriterion().unit_scores(model, groups, ctx)
    for group in groups:
        np.testing.assert_array_equal(scores[group.name], absolute[group.name])


@pytest.mark.parametrize(("name", "kwargs"), FAMILY_CASES)
def test_mp_scores_are_finite_and_positive(name, kwargs):
    model = make_model(name, kwargs)
    torch.manual_seed(1)
    calib = torch.randn(3, *input_size(model))
    groups = get_family(model).channel_groups(model)
    residual_free = get_family(model).name in ("resnet", "regnet")  # see families/resnet.py
    assert all((g.residual_module is None) == residual_free for g in groups)
    scores = MPCriterion().unit_scores(model, groups, ScoringContext(calib, {}))
    for group in groups:
        values = scores[group.name]
        assert values.shape == (group.units,)
        # ≥ 0, not > 0: a channel that is dead after ReLU on the batch has zero energy
        assert np.isfinite(values).all() and (values >= 0).all() and values.max() > 0


def test_mp_absolute_is_kept_for_the_comparison_but_is_not_a_cli_choice():
    import click

    from mpdeploy.cli import cli

    assert CRITERIA["mp"] is MPCriterion and CRITERIA["mp_absolute"] is MPAbsoluteCriterion
    choices = [
        param.type.choices
        for command in cli.commands.values()
        for param in command.params
        if param.name == "method" and isinstance(param.type, click.Choice)
    ]
    assert choices and all("mp" in c and "mp_absolute" not in c for c in choices)
    # every other registered criterion is offered, and nothing the registry lacks
    assert all(set(c) == set(CRITERIA) - {"mp_absolute"} for c in choices)


def test_fisher_scores_a_constant_unit_zero_after_bias_compensation():
    """mp_fisher scores the KL change of replacing a unit by its calibration mean: a neuron whose
    activation is constant loses nothing (bias compensation restores it exactly)."""
    from mpdeploy.prune.criteria import FisherCriterion, MPFisherCriterion

    model = make_model("test_vit", {})
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[5] = 0.0
        model.blocks[0].mlp.fc1.bias[5] = 1.0
    calib = torch.randn(6, *input_size(model))
    groups = get_family(model).channel_groups(model)
    ctx = ScoringContext(calib, {"blocks.0.mlp.fc2": 2.0}, batch_size=4)
    plain = FisherCriterion().unit_scores(model, groups, ctx)
    scores = MPFisherCriterion().unit_scores(model, groups, ctx)
    mlp = scores["blocks.0.mlp"]
    assert mlp[5] <= 1e-8 * mlp.max() < np.delete(mlp, 5).min()  # float32 rounding only
    np.testing.assert_allclose(mlp, plain["blocks.0.mlp"] / 2.0, rtol=1e-12)  # budget weight
    again = MPFisherCriterion().unit_scores(model, groups, ctx)
    assert all(np.array_equal(again[g], scores[g]) for g in scores)  # seeded label samples
    assert all(p.grad is None for p in model.parameters())


def test_mp_fisher_robust_adds_two_standard_errors_of_the_fold_means_by_hand():
    """mp_fisher_robust = mp_fisher_taylor's E[a²] + 2 · std over folds of the fold means of a² /
    √folds (a: a unit's per-image loss change), over the budget weight; one fold: exactly
    mp_fisher_taylor."""
    from mpdeploy.prune.criteria import MPFisherRobustCriterion, MPFisherTaylorCriterion
    from mpdeploy.prune.obs import fold_ids

    model = make_model("test_vit", {})
    calib = torch.randn(12, *input_size(model))
    groups = get_family(model).channel_groups(model)
    photos = ["a", "b", "c"] * 4  # round-robin crops of three photos
    folds = fold_ids(photos, 12)
    ctx = ScoringContext(calib, {"blocks.0.mlp.fc2": 2.0}, batch_size=4, folds=folds)
    captured = {}

    class Spy(MPFisherRobustCriterion):
        def _unit_score(self, per_unit, ctx):
            captured[len(captured)] = per_unit.clone()
            return super()._unit_score(per_unit, ctx)

    robust = Spy().unit_scores(model, groups, ctx)
    plain = MPFisherTaylorCriterion().unit_scores(model, groups, ctx)
    index = [g.name for g in groups].index("blocks.0.mlp")
    a2 = captured[index].numpy()  # (images, units): the squared change, one draw per image
    fold_means = np.stack([a2[folds.numpy() == f].mean(0) for f in range(3)])
    by_hand = (a2.mean(0) + 2.0 * fold_means.std(0, ddof=1) / np.sqrt(3)) / 2.0
    np.testing.assert_allclose(robust["blocks.0.mlp"], by_hand, rtol=1e-10)
    np.testing.assert_allclose(plain["blocks.0.mlp"], a2.mean(0) / 2.0, rtol=1e-10)
    assert all((robust[g] >= plain[g] - 1e-15).all() for g in plain if "mlp" in g)
    # every image from one photo: no spread to estimate, the scores are mp_fisher_taylor's
    one = ScoringContext(
        calib, {"blocks.0.mlp.fc2": 2.0}, batch_size=4, folds=fold_ids(["a"] * 12, 12)
    )
    same = MPFisherRobustCriterion().unit_scores(model, groups, one)
    assert all(np.array_equal(same[g], plain[g]) for g in plain)


def test_fisher_draws_average_each_images_draws():
    """Eight label draws per image: where the model is certain every draw is the same label, so
    the average is exactly one draw's score; where it is not, the scores vary less between
    seeds than one draw's."""
    from mpdeploy.prune.criteria import MPFisherDrawsCriterion, MPFisherTaylorCriterion

    model = make_model("test_vit", {})
    calib = torch.randn(10, *input_size(model))
    groups = get_family(model).channel_groups(model)

    def scores(criterion, seed):
        ctx = ScoringContext(calib, {"blocks.0.mlp.fc2": 2.0}, batch_size=4, seed=seed)
        return criterion.unit_scores(model, groups, ctx)

    def spread(criterion):  # mean over units of the std / mean over seeds 0-3
        runs = np.stack([scores(criterion, seed)["blocks.0.mlp"] for seed in range(4)])
        return float((runs.std(0) / runs.mean(0)).mean())

    assert MPFisherDrawsCriterion.draws == 8
    assert spread(MPFisherDrawsCriterion()) < 0.6 * spread(MPFisherTaylorCriterion())
    with torch.no_grad():
        model.head.bias[3] = 1e4  # softmax exactly one-hot: every draw is class 3
    one, eight = scores(MPFisherTaylorCriterion(), 0), scores(MPFisherDrawsCriterion(), 0)
    for name in one:
        np.testing.assert_allclose(eight[name], one[name], rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_prune_model_refuses_calibration_groups_of_the_wrong_length():
    from mpdeploy.errors import UserError
    from mpdeploy.prune import PruneConfig, prune_model

    model = make_model("test_vit", {})
    calib = torch.randn(8, *input_size(model))
    with pytest.raises(UserError, match="7 calibration groups for 8 calibration images"):
        prune_model(
            model,
            calib,
            None,
            PruneConfig(target_macs=0.3, method="mp_fisher_robust"),
            groups=["p"] * 7,
        )


def test_prune_model_records_the_folds_its_scores_were_taken_over():
    """Crops of three photos: three folds; distinct images: one chunk each, at most 16."""
    from mpdeploy.prune import PruneConfig, prune_model

    model = make_model("test_vit", {})
    calib = torch.randn(12, *input_size(model))
    config = PruneConfig(target_macs=0.3, method="mp_fisher_robust")
    by_photo = prune_model(model, calib, None, config, groups=["a", "b", "c"] * 4)
    assert by_photo.plan["method"] == "mp_fisher_robust"
    assert by_photo.plan["calibration"]["score_folds"] == 3
    distinct = prune_model(model, calib, None, config)
    assert distinct.plan["calibration"]["score_folds"] == 12
    # a criterion that never reads folds records none
    plain = prune_model(model, calib, None, PruneConfig(target_macs=0.3), groups=["a"] * 12)
    assert plain.plan["calibration"]["score_folds"] is None


class _EveryClass:
    """Test oracle: the label expectation by enumeration, every class a draw at weight p_c."""

    def _label_draws(self, probs, generator, draws):
        return [
            (torch.full_like(probs[:, 0], c, dtype=torch.long), probs[:, c]) for c in range(draws)
        ]


def test_fisher_split_is_the_exact_expectation_with_two_classes_and_less_noisy_with_more():
    """mp_fisher_split: the top class at weight p₁ + one other class at weight 1 − p₁. With two
    classes that is the whole expectation Σ_c p_c (g_c·Δ)², whatever the seed; with ten its seed
    spread is below one sampled label's."""
    from mpdeploy.prune.criteria import MPFisherSplitCriterion, MPFisherTaylorCriterion

    def scores(criterion, model, seed):
        calib = torch.randn(10, *input_size(model), generator=torch.Generator().manual_seed(5))
        ctx = ScoringContext(calib, {"blocks.0.mlp.fc2": 2.0}, batch_size=4, seed=seed)
        return criterion.unit_scores(model, get_family(model).channel_groups(model), ctx)

    two = make_model("test_vit", {"num_classes": 2})
    with torch.no_grad():  # a random model is ~50:50 on two classes; make it fairly sure
        two.head.bias.copy_(torch.tensor([2.0, 0.0]))

    class Exact(_EveryClass, MPFisherTaylorCriterion):
        draws = 2

        def draws_for(self, ctx):
            return 2

    exact = scores(Exact(), two, 0)
    for seed in (0, 1):
        split = scores(MPFisherSplitCriterion(), two, seed)
        for name in exact:
            np.testing.assert_allclose(split[name], exact[name], rtol=1e-9)
    # one sampled label is not the expectation: the test above could fail
    one = scores(MPFisherTaylorCriterion(), two, 0)["blocks.0.mlp"]
    assert not np.allclose(one, exact["blocks.0.mlp"], rtol=1e-3, atol=0)

    ten = make_model("test_vit", {})
    assert ten.num_classes > 2
    with torch.no_grad():  # fairly sure of class 3 (p ≈ 0.75 of 1000), as a trained model is
        ten.head.bias[3] = 8.0

    def spread(criterion):  # mean over units of the std / mean over seeds 0-3
        runs = np.stack([scores(criterion, ten, seed)["blocks.0.mlp"] for seed in range(4)])
        return float((runs.std(0) / runs.mean(0)).mean())

    assert spread(MPFisherSplitCriterion()) < 0.6 * spread(MPFisherTaylorCriterion())
    assert all(p.grad is None for p in ten.parameters())
    # the heads go in `taylor`'s order, from the top-1 stratum's backward (no backward of its own)
    from mpdeploy.prune.criteria import TaylorCriterion

    taylor = scores(TaylorCriterion(), ten, 0)
    split = scores(MPFisherSplitCriterion(), ten, 1)
    heads = [g.name for g in get_family(ten).channel_groups(ten) if g.kind == "attn_heads"]
    assert heads
    for name in heads:
        assert len(set(taylor[name])) == len(taylor[name])  # no ties: the order is defined
        np.testing.assert_array_equal(np.argsort(split[name]), np.argsort(taylor[name]))
