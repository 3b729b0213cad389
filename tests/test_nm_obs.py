"""OBS k:n projection: exact k of n along TensorRT's axis, exactness of the choice and the update."""

from __future__ import annotations

import itertools

import pytest
import torch

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.cli import main
from mpdeploy.errors import UserError
from mpdeploy.prune.layout import conforms, grouped
from mpdeploy.prune.nm import SparsityConfig, sparsify
from mpdeploy.prune.obs import capture_hessians, obs_project


def correlated_rows(rows: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64)
    return torch.randn(rows, features, generator=g, dtype=torch.float64) @ mix


def refit_error(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> float:
    """Σ over rows of min_v ‖X w − X_keep v‖² / N: the calibration output error after the re-fit."""
    total = 0.0
    for row, kept in zip(w, keep, strict=True):
        y = x @ row
        xs = x[:, kept]
        v = torch.linalg.lstsq(xs, y.unsqueeze(1)).solution.squeeze(1)
        total += float(((xs @ v - y) ** 2).sum())
    return total / x.shape[0]


@pytest.mark.parametrize("shape", [(6, 16), (8, 12, 3, 3)])
def test_obs_keeps_exactly_k_of_every_n_along_cin_in_tensorrt_order(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    features = weight[0].numel()
    x = correlated_rows(4 * features, features, seed=1)
    projection = obs_project(weight, x.T @ x / x.shape[0], 2, 4)
    # TensorRT's order: (out, kh, kw, Cin) flattened, groups of 4 consecutive input channels
    flat = projection.mask.permute(0, 2, 3, 1) if len(shape) == 4 else projection.mask
    assert (flat.reshape(shape[0], -1, 4).sum(-1) == 2).all()
    assert (grouped(projection.mask, 4).sum(-1) == 2).all()
    assert conforms(projection.weight, 2, 4)
    assert bool((projection.weight[~projection.mask] == 0).all())


def test_a_weight_already_in_pattern_is_left_unchanged():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 16, generator=g, dtype=torch.float64)
    keep = torch.zeros(5, 4, 4, dtype=torch.bool)
    order = torch.rand(5, 4, 4, generator=g).argsort(-1)[..., :2]
    keep.scatter_(2, order, True)
    weight = weight * keep.reshape(5, 16)
    x = correlated_rows(64, 16, seed=4)
    projection = obs_project(weight, x.T @ x / 64, 2, 4, damp=0.0)
    assert torch.equal(projection.mask, keep.reshape(5, 16))
    torch.testing.assert_close(projection.weight, weight, rtol=0, atol=1e-10)
    assert projection.dropped_energy == pytest.approx(0.0, abs=1e-12)


def test_one_group_choice_is_the_exact_minimum_of_the_refit_error_and_beats_magnitude():
    x = correlated_rows(200, 4, seed=5)
    weight = torch.randn(12, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    projection = obs_project(weight, x.T @ x / 200, 2, 4, damp=0.0)
    magnitude = torch.zeros_like(projection.mask).scatter_(1, weight.abs().topk(2).indices, True)
    for i in range(weight.shape[0]):
        errors = {
            kept: refit_error(x, weight[i : i + 1], torch.tensor([list(kept)]))
            for kept in itertools.combinations(range(4), 2)
        }
        chosen = tuple(projection.mask[i].nonzero().squeeze(1).tolist())
        assert errors[chosen] == pytest.approx(min(errors.values()), rel=1e-9, abs=1e-12)
    obs_error = refit_error(x, weight, projection.mask)
    assert obs_error <= refit_error(x, weight, magnitude) + 1e-12
    assert projection.dropped_energy / weight.shape[0] == pytest.approx(
        obs_error / weight.shape[0], rel=1e-6
    )


def test_reported_cost_is_the_output_error_of_the_updated_weights_and_below_magnitude():
    x = correlated_rows(400, 32, seed=7)
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    projection = obs_project(weight, x.T @ x / 400, 2, 4, damp=0.0)
    error = float(((x @ (weight - projection.weight).T) ** 2).sum()) / 400
    assert projection.dropped_energy == pytest.approx(error, rel=1e-8)
    magnitude = torch.zeros(6, 8, 4, dtype=torch.bool)
    magnitude.scatter_(2, weight.reshape(6, 8, 4).abs().topk(2, dim=-1).indices, True)
    assert refit_error(x, weight, projection.mask) < refit_error(
        x, weight, magnitude.reshape(6, 32)
    )


def test_hessian_columns_follow_the_group_order_of_a_conv():
    conv = torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)
    images = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(9))
    model = torch.nn.Sequential(conv)
    hessian = capture_hessians(model, ["0"], images)["0"]
    patches = torch.nn.functional.unfold(images, 3, padding=1)  # (B, Cin·kh·kw, L), Cin major
    rows = patches.transpose(1, 2).reshape(-1, 8, 9).transpose(1, 2).reshape(-1, 72).double()
    torch.testing.assert_close(hessian.gram, rows.T @ rows)
    assert hessian.rows == 50


def test_sparsify_with_obs_on_a_resnet_is_in_pattern_and_records_the_method(one_thread):
    model = timm.create_model("test_resnet", num_classes=10).eval()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    config = SparsityConfig(2, 4, method="obs", compensate="none")
    result = sparsify(model, images, config, input_shape=(3, 32, 32))
    assert result.masks and result.report["method"] == "obs"
    for name, mask in result.masks.items():
        weight = result.model.get_parameter(name).detach()
        assert (grouped(mask, 4).sum(-1) == 2).all(), name
        assert conforms(weight, 2, 4) and bool((weight[~mask] == 0).all()), name


def test_cli_accepts_the_obs_method_and_refuses_an_unknown_one(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_build(opts, **kwargs):
        seen["method"] = opts.sparsity_method
        raise UserError("stopped by the test")

    import mpdeploy.pipeline

    real_build = mpdeploy.pipeline.build
    monkeypatch.setattr("mpdeploy.pipeline.build", fake_build)
    code = main(["build", "--weights", "none", "--sparsity", "2:4", "--sparsity-method", "obs"])
    assert code != 0 and seen == {"method": "obs"}
    assert "stopped by the test" in capsys.readouterr().err
    monkeypatch.setattr("mpdeploy.pipeline.build", real_build)
    code = main(["build", "--weights", "none", "--sparsity", "2:4", "--sparsity-method", "sgpt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "unknown --sparsity-method 'sgpt'" in err[0]
    assert not any(tmp_path.iterdir())


def test_logit_weighted_hessian_weights_each_row_by_its_output_gradient_energy():
    g = torch.Generator().manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    images = torch.randn(10, 8, generator=g)
    hessian = capture_hessians(model, ["0"], images, batch_size=4, logit_weighted=True)["0"]
    # independent: per-image gradient of CE(z, y) at layer 0's output, y drawn as the capture does
    sampler = torch.Generator().manual_seed(0)
    rows, weights = [], []
    for batch in images.split(4):
        out = model[0](batch).detach().requires_grad_(True)
        z = model[2](model[1](out))
        y = torch.multinomial(torch.softmax(z.detach().double(), 1), 1, generator=sampler)
        (grad,) = torch.autograd.grad(
            torch.nn.functional.cross_entropy(z, y[:, 0], reduction="sum"), out
        )
        rows.append(batch.double())
        weights.append(grad.double().pow(2).sum(1))
    x, a = torch.cat(rows), torch.cat(weights)
    torch.testing.assert_close(hessian.logit.gram, (x * a[:, None]).T @ x)
    assert hessian.logit.weight == pytest.approx(float(a.sum()), rel=1e-9)
    torch.testing.assert_close(hessian.gram, x.T @ x)
    uniform = x.T @ x / 10
    weighted = (x * a[:, None]).T @ x / a.sum()
    torch.testing.assert_close(hessian.matrix(centered=False), uniform + weighted)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: no .grad written


def test_sparsify_with_obs_fisher_on_a_vit_is_in_pattern_and_differs_from_obs(one_thread):
    model = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8).eval()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    results = {
        method: sparsify(
            model,
            images,
            SparsityConfig(2, 4, method=method, compensate="none"),
            input_shape=(3, 32, 32),
        )
        for method in ("obs", "obs_fisher")
    }
    fisher = results["obs_fisher"]
    assert fisher.report["method"] == "obs_fisher" and fisher.masks
    for name, mask in fisher.masks.items():
        assert (grouped(mask, 4).sum(-1) == 2).all(), name
    assert any(
        not torch.equal(mask, results["obs"].masks[name]) for name, mask in fisher.masks.items()
    )
    assert all(p.grad is None for p in model.parameters())
