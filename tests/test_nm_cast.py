"""CAST projection: the search against brute force, magnitude as C = I, im2col rows, the row cap."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.prune import cast
from mpdeploy.prune.layout import conforms, grouped
from mpdeploy.prune.nm import SparsityConfig, _steps, sparsify


def random_moments(pixels: int, groups: int, n: int, seed: int = 0) -> torch.Tensor:
    """Positive-definite, strongly correlated within-group second moments."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(pixels, groups, n, n, generator=g)
    return basis @ basis.transpose(-1, -2) + 0.1 * torch.eye(n)


def brute_force_costs(w: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """min over all keep patterns of rᵀ C r per (row, pixel, group), by plain loops."""
    out, pixels, groups, n = w.shape
    best = np.full((out, pixels, groups), np.inf)
    for kept in itertools.combinations(range(n), k):
        d = np.ones(n)
        d[list(kept)] = 0
        for o, p, g in itertools.product(range(out), range(pixels), range(groups)):
            r = d * w[o, p, g]
            best[o, p, g] = min(best[o, p, g], r @ c[p, g] @ r)
    return best


@pytest.mark.parametrize("shape", [(5, 12), (3, 8, 3, 3)])
def test_cast_picks_the_minimum_cost_pattern_of_every_cell(shape):
    k, n = 2, 4
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    pixels = 1 if len(shape) == 2 else shape[2] * shape[3]
    moments = random_moments(pixels, shape[1] // n, n)
    projection = cast.project(weight, moments, k, n)
    assert conforms(weight * projection.mask, k, n)
    assert (grouped(projection.mask, n).sum(-1) == k).all()
    w = grouped(weight, n).double().numpy()
    d = (~grouped(projection.mask, n)).double().numpy()
    chosen = np.einsum("opgi,pgij,opgj->opg", d * w, moments.double().numpy(), d * w)
    np.testing.assert_allclose(chosen, brute_force_costs(w, moments.double().numpy(), k), rtol=1e-5)
    assert projection.dropped_energy == pytest.approx(chosen.sum(), rel=1e-4)


def test_magnitude_keeps_the_k_largest_weights_of_each_group():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    projection = cast.project(weight, random_moments(1, 8, 4), 2, 4, method="magnitude")
    groups = grouped(weight, 4).abs()
    expected = torch.zeros_like(groups, dtype=torch.bool)
    expected.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    assert torch.equal(grouped(projection.mask, 4), expected)


def test_cast_drops_less_calibration_energy_than_magnitude():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    moments = random_moments(1, 16, 4, seed=4)
    cast_drop = cast.project(weight, moments, 2, 4).dropped_energy
    magnitude_drop = cast.project(weight, moments, 2, 4, method="magnitude").dropped_energy
    assert cast_drop < 0.9 * magnitude_drop


def test_candidate_patterns_enumerate_or_sample():
    patterns, sampled = cast.candidate_patterns(2, 4)
    assert not sampled and patterns.shape == (6, 4) and (patterns.sum(1) == 2).all()
    patterns, sampled = cast.candidate_patterns(6, 12)
    assert not sampled and patterns.shape[0] == math.comb(12, 6)
    patterns, sampled = cast.candidate_patterns(8, 16, seed=0)  # C(16, 8) = 12,870 ≥ 5,000
    assert sampled and patterns.shape == (1024, 16) and (patterns.sum(1) == 8).all()
    assert torch.unique(patterns, dim=0).shape[0] == 1024
    assert torch.equal(patterns, cast.candidate_patterns(8, 16, seed=0)[0])


def test_sampled_search_never_loses_to_magnitude():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    moments = random_moments(1, 2, 16, seed=6)
    projection = cast.project(weight, moments, 8, 16)
    magnitude = cast.project(weight, moments, 8, 16, method="magnitude")
    assert conforms(weight * projection.mask, 8, 16)
    assert projection.dropped_energy <= magnitude.dropped_energy + 1e-6


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 3, stride=2, padding=2, dilation=2)]
)
def test_conv_rows_are_im2col_patches_split_per_kernel_pixel(conv):
    x = torch.randn(2, 8, 7, 9)
    rows = cast.input_rows(conv, x, None)  # (B·L, pixels, Cin)
    cols = F.unfold(x, 3, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    expected = cols.reshape(2, 8, 9, -1).permute(0, 3, 2, 1).reshape(-1, 9, 8)
    assert rows.shape[0] == cast.conv_positions(conv, x)
    assert torch.equal(rows, expected)
    # the rows reproduce the convolution with TensorRT's weight grouping
    w = conv.weight.detach().permute(0, 2, 3, 1).reshape(4, 9, 8)
    out = torch.einsum("rpc,opc->ro", rows, w) + conv.bias.detach()
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_capture_caps_rows_and_is_seeded():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(1)
    )
    images = torch.randn(10, 3, 12, 12)
    first, logits = cast.capture_group_moments(model, ["2"], images, 4, max_rows=100, batch_size=3)
    again, _ = cast.capture_group_moments(model, ["2"], images, 4, max_rows=100, batch_size=3)
    assert first["2"].rows == 100 and first["2"].total.shape == (9, 2, 4, 4)
    assert torch.equal(first["2"].total, again["2"].total)
    torch.testing.assert_close(logits, model(images))
    everything, _ = cast.capture_group_moments(model, ["2"], images, 4, max_rows=10**6)
    rows = cast.input_rows(model[2], model[1](model[0](images)), None).double()
    h = rows.reshape(rows.shape[0], 9, 2, 4)
    torch.testing.assert_close(everything["2"].mean, torch.einsum("rpgi,rpgj->pgij", h, h) / len(h))


@pytest.fixture(scope="module")
def vit_one_pass_and_sequential():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=64).eval()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    results = {
        mode: sparsify(
            model,
            images,
            SparsityConfig(2, 4, "cast", sequential=mode, max_rows=256, batch_size=4),
            input_shape=(3, 64, 64),
        )
        for mode in ("off", "block", "layer")
    }
    return model, results


@pytest.mark.parametrize("mode", ["block", "layer"])
def test_sequential_cast_keeps_k_of_n_and_starts_from_the_one_pass_masks(
    vit_one_pass_and_sequential, mode
):
    model, results = vit_one_pass_and_sequential
    one_pass, sequential = results["off"], results[mode]
    assert sequential.report["sequential"] == mode
    assert list(sequential.masks) == list(one_pass.masks)
    for param, mask in sequential.masks.items():
        assert (grouped(mask, 4).sum(-1) == 2).all(), param
        assert conforms(sequential.model.get_parameter(param).detach(), 2, 4), param
    first = next(iter(one_pass.masks))  # blocks.0.attn.qkv.weight: the same dense input in both
    assert first == "blocks.0.attn.qkv.weight"
    assert torch.equal(sequential.masks[first], one_pass.masks[first])
    # later layers see the already-sparse network, so some masks must move
    assert any(not torch.equal(sequential.masks[p], one_pass.masks[p]) for p in one_pass.masks)


def test_sequential_block_mode_matches_one_pass_on_the_whole_first_block(
    vit_one_pass_and_sequential,
):
    _, results = vit_one_pass_and_sequential
    for param, mask in results["block"].masks.items():
        if param.startswith("blocks.0."):
            assert torch.equal(mask, results["off"].masks[param]), param


def test_sequential_steps_follow_blocks_or_layers():
    names = [
        "stages.0.blocks.0.mlp.fc1",
        "stages.0.blocks.0.mlp.fc2",
        "stages.1.downsample.1",
        "stages.1.blocks.0.mlp.fc1",
        "layer1.0.conv1",
        "layer1.0.downsample.0",
        "fc",
    ]
    assert _steps(names, "off") == [names]
    assert _steps(names, "layer") == [[name] for name in names]
    assert _steps(names, "block") == [
        names[:2],
        ["stages.1.downsample.1"],
        ["stages.1.blocks.0.mlp.fc1"],
        ["layer1.0.conv1", "layer1.0.downsample.0"],
        ["fc"],
    ]


def test_stopping_the_forward_early_captures_the_same_moments():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    images = torch.randn(10, 8)
    full, _ = cast.capture_group_moments(model, ["0", "2"], images, 4, batch_size=3)
    part, logits = cast.capture_group_moments(
        model, ["2"], images, 4, batch_size=3, seed_index={"2": 1}, stop_early=True
    )
    assert logits is None
    assert torch.equal(part["2"].total, full["2"].total) and part["2"].rows == full["2"].rows
