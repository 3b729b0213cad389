"""Closed-form compensation: exact where the algebra says so, equal to numpy's least squares."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from test_prune_fixtures import input_size, make_model
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import get_family
from mpdeploy.families.surgery import prune_groups
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.compensate import (
    MAX_PRIOR,
    CompensateConfig,
    LayerFit,
    compensate,
    masked_layers,
    parse_compensation,
    reestimate_batchnorm,
    structured_layers,
)


def _linear_pair(seed: int = 0, inputs: int = 6, outputs: int = 4):
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Identity(), nn.Linear(inputs, outputs)).double()
    x = torch.randn(64, inputs, dtype=torch.float64) * torch.linspace(0.5, 2, inputs) + 0.3
    return dense, x


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    design = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
    return np.linalg.lstsq(design, y, rcond=None)[0]  # (features + 1, out)


def test_lsq_matches_numpy_lstsq():
    dense, x = _linear_pair()
    kept = torch.tensor([0, 2, 3, 5])
    pruned = copy.deepcopy(dense)
    pruned[1] = nn.Linear(4, 4).double()
    record = compensate(
        dense, pruned, x, [LayerFit("1", in_features=kept)], CompensateConfig("lsq", ridge=0.0)
    )
    y = dense(x).detach().numpy()
    beta = _lstsq(x[:, kept].numpy(), y)
    np.testing.assert_allclose(pruned[1].weight.detach().numpy(), beta[:-1].T, atol=1e-9)
    np.testing.assert_allclose(pruned[1].bias.detach().numpy(), beta[-1], atol=1e-9)
    assert record["layers"]["1"]["fit"] == "lsq" and record["layers"]["1"]["rows"] == 64


def test_masked_lsq_solves_each_row_on_its_own_support():
    dense, x = _linear_pair(seed=1, inputs=8)
    support = torch.zeros(4, 8, dtype=torch.bool)
    for row in range(4):  # 2:4 along the inputs, a different pattern per row
        support[row, [row % 4, 4 + (row + 1) % 4]] = True
        support[row, [(row + 2) % 4, 4 + (row + 3) % 4]] = True
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[1].weight.mul_(support)
    compensate(
        dense, pruned, x, [LayerFit("1", support=support)], CompensateConfig("lsq", ridge=0.0)
    )
    y = dense(x).detach().numpy()
    weight = pruned[1].weight.detach().numpy()
    assert (weight[~support.numpy()] == 0).all()  # the N:M pattern survives the fit
    for row in range(4):
        cols = support[row].nonzero().squeeze(1).numpy()
        beta = _lstsq(x[:, cols].numpy(), y[:, row])
        np.testing.assert_allclose(weight[row, cols], beta[:-1], atol=1e-9)
        assert float(pruned[1].bias[row].detach()) == pytest.approx(beta[-1], abs=1e-9)


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("rho", [0.3, 1.0])
def test_a_prior_fits_on_the_shrunk_moment_pulling_the_kept_weights_towards_dense(rho, solver):
    """LayerFit.prior = ρ: each row's kept weights and bias minimise ‖X_S v + c − y‖² +
    λ‖v − w_S‖², λ = n·μ·ρ/(1 − ρ) (ρ clipped to MAX_PRIOR), μ the mean input variance: numpy's
    lstsq on the system with √λ·I rows appended."""
    dense, x = _linear_pair(seed=2, inputs=8)
    support = torch.zeros(4, 8, dtype=torch.bool)
    for row in range(4):
        support[row, [row % 4, (row + 1) % 4, 4 + row % 4, 4 + (row + 2) % 4]] = True

    def masked():
        twin = copy.deepcopy(dense)
        with torch.no_grad():
            twin[1].weight.mul_(support)
        return twin

    pruned = masked()
    record = compensate(
        dense,
        pruned,
        x,
        [LayerFit("1", support=support, prior=rho)],
        CompensateConfig("lsq", ridge=0.0, nm_solver=solver),
    )
    assert record["layers"]["1"]["prior"] == rho
    assert record["layers"]["1"]["solver"] == solver
    shrink = min(rho, MAX_PRIOR)
    mu = float(x.var(0, unbiased=False).mean())
    lam = x.shape[0] * mu * shrink / (1 - shrink)
    y = dense(x).detach().numpy()
    w = dense[1].weight.detach().numpy()
    weight = pruned[1].weight.detach().numpy()
    assert (weight[~support.numpy()] == 0).all()
    for row in range(4):
        cols = support[row].nonzero().squeeze(1).numpy()
        design = np.concatenate([x[:, cols].numpy(), np.ones((x.shape[0], 1))], 1)
        prior = np.concatenate([np.sqrt(lam) * np.eye(len(cols)), np.zeros((len(cols), 1))], 1)
        target = np.concatenate([y[:, row], np.sqrt(lam) * w[row, cols]])
        beta = np.linalg.lstsq(np.concatenate([design, prior]), target, rcond=None)[0]
        # cg stops at a residual of 1e-4 of ‖b‖ (prune/nm_solve.py); exact is exact
        tol = 1e-8 if solver == "exact" else 1e-4
        np.testing.assert_allclose(weight[row, cols], beta[:-1], atol=tol)
        assert float(pruned[1].bias[row].detach()) == pytest.approx(beta[-1], abs=tol)
    plain = masked()
    compensate(
        dense, plain, x, [LayerFit("1", support=support)], CompensateConfig("lsq", ridge=0.0)
    )
    # the pull moves the fit towards the dense weights: nearer them than the plain fit is
    gap = np.abs(weight - w * support.numpy()).sum()
    plain_gap = np.abs(plain[1].weight.detach().numpy() - w * support.numpy()).sum()
    assert gap < plain_gap


def test_prune_model_records_the_compensation():
    model = make_model("mpdeploy_demo_vit", {})
    calib = torch.randn(8, 3, 32, 32)
    result = prune_model(model, calib, None, PruneConfig(0.3, method="magnitude"))
    record = result.plan["compensation"]
    assert record["method"] == PruneConfig(0.3).compensate == result.headline["compensate"]
    refitted = {g["consumer"] for g in result.plan["groups"] if g["units_removed"]}
    assert set(record["layers"]) == refitted and refitted


@pytest.mark.parametrize("method", ["bias", "lsq", "lsq+bn"])
def test_nothing_removed_leaves_the_weights_unchanged(method):
    model = make_model("test_resnet", {})
    calib = torch.randn(4, 3, 32, 32)
    groups = get_family(model).channel_groups(model)
    assert structured_layers(model, groups, {}) == []  # the planner's list of layers to re-fit
    pruned = copy.deepcopy(model)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    compensate(model, pruned, calib, [], CompensateConfig(method))
    for name, value in pruned.state_dict().items():
        if "running" in name or "num_batches" in name:
            continue
        assert torch.equal(before[name], value), name


def test_full_support_lsq_and_bias_reproduce_a_3x3_conv():
    """im2col rows and weight.reshape(out, -1) agree: a conv that lost nothing is re-fitted to
    itself (lsq, ridge 0) and its bias is not moved (bias)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Identity(), nn.Conv2d(3, 5, 3, padding=1, stride=2)).double()
    x = torch.randn(8, 3, 9, 9, dtype=torch.float64)
    for method in ("lsq", "bias"):
        pruned = copy.deepcopy(dense)
        compensate(dense, pruned, x, [LayerFit("1")], CompensateConfig(method, ridge=0.0))
        torch.testing.assert_close(pruned[1].weight, dense[1].weight, atol=1e-8, rtol=0)
        torch.testing.assert_close(pruned[1].bias, dense[1].bias, atol=1e-8, rtol=0)


def _constant_unit(model: nn.Module, fc1: str, unit: int, value: float) -> None:
    with torch.no_grad():
        layer = model.get_submodule(fc1)
        layer.weight[unit] = 0.0
        layer.bias[unit] = value


def test_bias_exactly_compensates_a_removed_constant_neuron():
    model = make_model("test_vit", {})
    _constant_unit(model, "blocks.0.mlp.fc1", 5, 1.0)  # GELU(1) for every image and token
    calib = torch.randn(4, *input_size(model))
    groups = get_family(model).channel_groups(model)
    group = next(g for g in groups if g.name == "blocks.0.mlp")
    keep = {group.name: [c for c in range(group.width) if c != 5]}
    for method, exact in (("none", False), ("bias", True)):
        pruned = prune_groups(copy.deepcopy(model), keep)
        layers = structured_layers(model, groups, {group.name: {5}})
        compensate(model, pruned, calib, layers, CompensateConfig(method))
        with torch.no_grad():
            error = float((pruned(calib) - model(calib)).abs().max())
        assert (error < 1e-5) == exact, (method, error)


def test_bias_folds_into_the_batchnorm_of_a_biasless_conv():
    """ResNet bottleneck conv2 → bn2 → conv3: a constant channel removed from the conv2 group is
    made up for through bn3's running mean (conv3 has no bias)."""
    model = make_model("test_resnet", {})
    groups = get_family(model).channel_groups(model)
    group = next(g for g in groups if g.name.endswith(".conv2") and g.kind == "conv_inner")
    block = group.name.rsplit(".", 1)[0]
    with torch.no_grad():
        model.get_submodule(f"{block}.conv2").weight[3] = 0.0
        bn = model.get_submodule(f"{block}.bn2")
        bn.weight[3], bn.bias[3] = 0.0, 1.5  # relu(1.5) everywhere
    calib = torch.randn(4, *input_size(model))
    keep = {group.name: [c for c in range(group.width) if c != 3]}
    pruned = prune_groups(copy.deepcopy(model), keep)
    layers = structured_layers(model, groups, {group.name: {3}})
    record = compensate(model, pruned, calib, layers, CompensateConfig("bias"))
    assert record["layers"][f"{block}.conv3"]["bias_into"] == f"{block}.bn3.running_mean"
    with torch.no_grad():
        torch.testing.assert_close(pruned(calib), model(calib), atol=1e-4, rtol=1e-5)


def test_batchnorm_reestimation_is_the_calibration_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    calib = torch.randn(10, 3, 5, 5) * 2 + 1
    assert reestimate_batchnorm(model, calib, batch_size=4) == 1
    with torch.no_grad():
        feats = model[0](calib)
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=0)
    per_batch = torch.stack([f.var((0, 2, 3)) * len(f) for f in feats.split(4)]).sum(0) / 10
    torch.testing.assert_close(model[1].running_var, per_batch, atol=1e-5, rtol=1e-5)
    assert not model.training and model[1].momentum == 0.1


def test_lsq_with_too_few_rows_falls_back_to_bias_and_says_so(caplog):
    dense, x = _linear_pair(inputs=6)
    pruned = copy.deepcopy(dense)
    pruned[1] = nn.Linear(5, 4).double()
    kept = torch.tensor([0, 1, 2, 3, 4])
    with caplog.at_level(logging.WARNING):
        record = compensate(
            dense, pruned, x[:4], [LayerFit("1", in_features=kept)], CompensateConfig("lsq")
        )
    assert record["lsq_fell_back_to_bias"] == ["1"]
    assert record["layers"]["1"]["fit"] == "bias" and record["layers"]["1"]["lsq_needs_images"] == 6
    assert "needs 6 images, got 4" in caplog.text


def test_masked_layers_reads_nm_masks():
    masks = {"blocks.0.mlp.fc1.weight": torch.ones(8, 4, dtype=torch.bool)}
    (fit,) = masked_layers(masks)
    assert fit.name == "blocks.0.mlp.fc1" and fit.support.shape == (8, 4)


def test_unknown_compensation_is_a_user_error():
    assert parse_compensation("lsq+bn") == ("lsq", "bn") and parse_compensation("none") == ()
    with pytest.raises(UserError, match="unknown --compensate 'ols'"):
        PruneConfig(0.5, compensate="ols")
    model = make_model("test_vit", {})
    with pytest.raises(UserError, match="at least 2 calibration images"):
        prune_model(model, torch.randn(1, *input_size(model)), None, PruneConfig(0.3, "magnitude"))


def _chain(seed: int):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5)]
    return nn.Sequential(*layers).double()


def test_sequential_inputs_fit_each_layer_on_the_refitted_layers_before_it():
    """Unit 5 of the first hidden layer is cut, so the re-fit of the layer reading it cannot be
    exact. With `sequential` the last layer is then the least-squares fit (numpy.linalg.lstsq) of
    the dense layer's output on what the *re-fitted* middle layer feeds it, so its squared error
    on the calibration rows is the smallest of the three modes (`dense` fits on the dense layer's
    input, `pruned` on the unfitted middle layer's output). Layers given out of order are fitted
    in forward order."""
    dense = _chain(0)
    kept = torch.tensor([0, 1, 2, 3, 4])
    x = torch.randn(200, 4, dtype=torch.float64)
    first = dense[1](dense[0](x)).detach()
    target = dense(x).detach()
    errors = {}
    for inputs in ("sequential", "pruned", "dense"):
        pruned = copy.deepcopy(dense)
        pruned[0], pruned[2] = nn.Linear(4, 5).double(), nn.Linear(5, 10).double()
        with torch.no_grad():
            pruned[0].weight.copy_(dense[0].weight[kept])
            pruned[0].bias.copy_(dense[0].bias[kept])
            pruned[2].weight.copy_(dense[2].weight[:, kept])
            pruned[2].bias.copy_(dense[2].bias)
            pruned[4].weight.add_(0.3 * torch.randn_like(pruned[4].weight))
        layers = [LayerFit("4"), LayerFit("2", in_features=kept)]  # not in forward order
        config = CompensateConfig("lsq", ridge=0.0, inputs=inputs, batch_size=64)
        record = compensate(dense, pruned, x, layers, config)
        assert list(record["layers"]) == (["2", "4"] if inputs == "sequential" else ["4", "2"])
        beta = _lstsq(first[:, kept].numpy(), dense[2](first).detach().numpy())
        np.testing.assert_allclose(pruned[2].weight.detach().numpy(), beta[:-1].T, atol=1e-9)
        fed = pruned[:4](x).detach()
        if inputs == "sequential":
            beta = _lstsq(fed.numpy(), target.numpy())
            np.testing.assert_allclose(pruned[4].weight.detach().numpy(), beta[:-1].T, atol=1e-8)
            np.testing.assert_allclose(pruned[4].bias.detach().numpy(), beta[-1], atol=1e-8)
        if inputs == "dense":  # fitted on the dense middle layer: the dense weights again
            torch.testing.assert_close(pruned[4].weight, dense[4].weight, atol=1e-8, rtol=0)
        errors[inputs] = float(((pruned[4](fed).detach() - target) ** 2).sum())
    assert errors["sequential"] < 0.9 * min(errors["pruned"], errors["dense"]), errors


def test_unknown_compensation_inputs_is_a_user_error():
    with pytest.raises(UserError, match="dense, pruned, sequential"):
        CompensateConfig("lsq", inputs="upstream")
