"""obs_shrink: the OBS Hessian shrunk towards (tr H / F)·I by its between-fold sampling variance."""

from __future__ import annotations

import pytest
import torch

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.data.calibration import CalibrationSet
from mpdeploy.prune.layout import grouped
from mpdeploy.prune.nm import SparsityConfig, sparsify
from mpdeploy.prune.obs import MAX_FOLDS, Hessian, capture_hessians, fold_ids, obs_project

ALL_ROWS = 10**6  # more rows than any test batch has: every row is captured, none sampled


def conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1)
    ).eval()


def independent_rho(model, names, images, folds, centered) -> dict[str, float]:
    """ρ from per-fold captures made without folds: the weighted scatter of the fold moments
    (centred: of the fold covariances) around their weighted mean, written out as deviations
    (not the ‖M_f‖² identities the capture uses)."""
    pooled = capture_hessians(model, names, images, max_rows=ALL_ROWS)
    out = {}
    for name in names:
        total = pooled[name]
        parts = [
            capture_hessians(model, [name], images[folds == f], max_rows=ALL_ROWS)[name]
            for f in folds.unique().tolist()
        ]
        weights = [p.rows / total.rows for p in parts]
        moments = [p.matrix(centered=centered) for p in parts]
        mean = sum(w * m for w, m in zip(weights, moments, strict=True))
        scatter = sum(w * (m - mean).pow(2).sum() for w, m in zip(weights, moments, strict=True))
        variance = float(scatter) / (len(parts) - 1)
        h = total.matrix(centered=centered)
        target = torch.eye(h.shape[0], dtype=h.dtype) * h.diagonal().mean()
        out[name] = min(1.0, variance / float((h - target).pow(2).sum()))
    return out


@pytest.mark.parametrize("centered", [False, True])
def test_fold_capture_keeps_the_pooled_moment_and_its_rho_matches_per_fold_captures(centered):
    model = conv_model()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 1, 6, 6, generator=g)  # correlated channels: H far from a multiple of I
    images = base + 0.5 * torch.randn(30, 4, 6, 6, generator=g)
    images[::3] *= 1.5  # one kind of image more in fold 0: the folds disagree
    folds = torch.arange(30) % 3  # interleaved, as builtin crops are
    folds[-1] = 0  # and unequal
    names = ["0", "2"]
    plain = capture_hessians(model, names, images, max_rows=ALL_ROWS, batch_size=4)
    folded = capture_hessians(model, names, images, max_rows=ALL_ROWS, batch_size=4, folds=folds)
    expected = independent_rho(model, names, images, folds, centered)
    for name in names:
        a, b = plain[name], folded[name]
        assert b.rows == a.rows and b.folds.count == 3
        torch.testing.assert_close(b.gram, a.gram, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(b.sum_x, a.sum_x, rtol=1e-12, atol=1e-9)
        h, rho = b.shrunk(centered=centered)
        assert 0.0 < rho < 1.0
        assert rho == pytest.approx(expected[name], rel=1e-9)
        raw = b.matrix(centered=centered)
        mu = float(raw.diagonal().mean())
        torch.testing.assert_close(h, (1 - rho) * raw + rho * mu * torch.eye(raw.shape[0]))
        assert a.folds is None and a.shrunk(centered=centered)[1] == 0.0


def test_folds_that_hold_the_same_images_give_no_shrinkage():
    model = conv_model()
    images = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    doubled = torch.cat([images, images])
    folds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    hessian = capture_hessians(model, ["2"], doubled, max_rows=ALL_ROWS, folds=folds)["2"]
    assert hessian.folds.count == 2
    assert hessian.shrunk(centered=True)[1] < 1e-9


def test_full_shrinkage_is_the_identity_and_obs_then_keeps_the_largest_weights():
    features = 16
    hessian = Hessian(torch.eye(features, dtype=torch.float64) * 2.0, torch.zeros(features), 4)
    hessian.gram[0, 1] = hessian.gram[1, 0] = 1.0
    # a scatter far larger than H's distance from the identity: ρ clips at 1
    hessian.folds = type("Folds", (), {"count": 2, "square_sum": 1e6})()
    h, rho = hessian.shrunk(centered=False)
    assert rho == 1.0
    torch.testing.assert_close(h, torch.eye(features, dtype=torch.float64) * 0.5)
    weight = torch.randn(6, features, generator=torch.Generator().manual_seed(3))
    mask = obs_project(weight, h, 2, 4).mask
    magnitudes = grouped(weight.abs(), 4)
    top2 = magnitudes.argsort(-1, descending=True)[..., :2]
    expected = torch.zeros(magnitudes.shape, dtype=torch.bool).scatter_(-1, top2, True)
    assert torch.equal(grouped(mask, 4), expected)


def test_fold_ids_keep_photos_together_and_merge_distinct_images_into_at_most_max_folds():
    photos = fold_ids(["a", "b", "c", "a", "b", "c", "a"], 7)
    assert photos.tolist() == [0, 1, 2, 0, 1, 2, 0]
    distinct = fold_ids(None, 64)
    assert distinct.unique().numel() == MAX_FOLDS
    assert torch.equal(distinct, distinct.sort().values)  # contiguous chunks
    assert torch.bincount(distinct).tolist() == [4] * MAX_FOLDS
    with pytest.raises(ValueError, match="3 calibration groups for 4 images"):
        fold_ids(["a", "b", "c"], 4)


def test_builtin_crops_are_grouped_by_photo_and_folder_images_each_by_itself():
    images = torch.zeros(3, 3, 4, 4)
    crops = CalibrationSet(
        images,
        ["astronaut#crop(1,2,3,4)", "coffee#crop(0,0,5,5)+flip", "astronaut#crop(9,9,9,9)"],
        0,
        "",
        0,
        "builtin:photos",
    )
    assert crops.groups() == ["astronaut", "coffee", "astronaut"]
    folder = CalibrationSet(images, ["a#1.jpg", "a#2.jpg", "b.png"], 0, "", 0, "/data/calib")
    assert folder.groups() == ["a#1.jpg", "a#2.jpg", "b.png"]


def test_sparsify_obs_shrink_records_rho_and_one_fold_is_exactly_obs(one_thread):
    model = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8).eval()
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    images[6:] = images[6:] * 0.2 + 1.0  # two photos' worth of different statistics
    config = SparsityConfig(2, 4, method="obs_shrink")

    def run(method, groups):
        return sparsify(
            model,
            images,
            SparsityConfig(2, 4, method=method),
            input_shape=(3, 32, 32),
            groups=groups,
        )

    two = run("obs_shrink", ["p"] * 6 + ["q"] * 6)
    layers = [r for r in two.report["layers"] if r["eligible"]]
    assert two.report["method"] == config.method and layers
    assert all(0.0 <= r["shrinkage"] <= 1.0 for r in layers)
    assert any(r["shrinkage"] > 0.0 for r in layers)
    for name, mask in two.masks.items():
        assert (grouped(mask, 4).sum(-1) == 2).all(), name
    # one photo: no scatter to measure, ρ = 0, the same rows: obs's masks, its weights up to the
    # order of the Gram sums (rows are added image by image)
    one = run("obs_shrink", ["p"] * 12)
    plain = run("obs", None)
    assert all(r["shrinkage"] == 0.0 for r in one.report["layers"] if r["eligible"])
    assert all("shrinkage" not in r for r in plain.report["layers"])
    for name, mask in plain.masks.items():
        assert torch.equal(one.masks[name], mask), name
        torch.testing.assert_close(
            one.model.get_parameter(name), plain.model.get_parameter(name), rtol=1e-6, atol=1e-10
        )
    with pytest.raises(ValueError, match="11 calibration groups for 12 images"):
        run("obs_shrink", ["p"] * 11)
