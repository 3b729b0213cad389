"""The prune stage's MAC budgets: how many calibration images the score and compensation passes
read (`planner.calibration_split`), and that `prune_model` honours and records them."""

from __future__ import annotations

import pytest
import torch
from test_prune_fixtures import input_size, make_model

from mpdeploy.errors import UserError
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.planner import calibration_split


def _split(images, dense_macs, **kwargs):
    calib = None if images is None else torch.zeros(images, 1, 1, 1)
    return calibration_split(calib, dense_macs, PruneConfig(0.5, **kwargs))


def test_vit_b16_reads_34_and_68_of_256_and_small_models_read_everything():
    vit_b16 = _split(256, 17_563_828_224)
    assert (vit_b16["score_images"], vit_b16["compensate_images"]) == (34, 68)
    resnet50 = _split(256, 4_089_184_256)  # count_macs of timm resnet50 (docs/*.json)
    assert (resnet50["score_images"], resnet50["compensate_images"]) == (146, 256)
    small = _split(256, 5_000_000)
    assert (small["score_images"], small["compensate_images"]) == (256, 256)


def test_floors_none_and_fewer_images_than_the_floor():
    huge = _split(256, 1e13)  # a budget smaller than one image: the floors
    assert (huge["score_images"], huge["compensate_images"]) == (32, 64)
    few = _split(20, 1e13)
    assert (few["score_images"], few["compensate_images"]) == (20, 20)
    unbounded = _split(256, 1e13, score_macs=None, compensate_macs=None)
    assert (unbounded["score_images"], unbounded["compensate_images"]) == (256, 256)
    assert _split(None, 1e9)["score_images"] == 0
    with pytest.raises(UserError):
        PruneConfig(0.5, score_macs=-1.0)


def test_prune_model_scores_and_compensates_on_the_budgeted_images_only():
    model = make_model("test_vit", {})
    calib = torch.randn(80, *input_size(model), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[bool, int]] = []  # (the dense model itself?, batch); copies keep the hook
    handle = model.register_forward_pre_hook(
        lambda m, args: seen.append((m is model, args[0].shape[0]))
    )
    try:  # budgets below one image: the floors, 32 images for scores, 64 for compensation
        result = prune_model(
            model, calib, None, PruneConfig(0.5, score_macs=0.0, compensate_macs=0.0)
        )
    finally:
        handle.remove()
    split = result.plan["calibration"]
    assert (split["images"], split["score_images"], split["compensate_images"]) == (80, 32, 64)
    assert result.headline["calibration_images"] == 64
    dense = [n for is_dense, n in seen if is_dense and n > 1]  # batch-1 passes count MACs
    assert dense == [32, 32, 32]  # the score pass, then compensation's dense pass (headline too)
    pruned = [n for is_dense, n in seen if not is_dense and n > 1]
    assert pruned == [32, 32]  # the headline's pruned logits on the compensation images


@pytest.mark.parametrize(("calib_macs", "read"), [(0.0, 64), (None, 80)])
def test_sparsify_reads_the_budgeted_images(calib_macs, read):
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    model = make_model("test_vit", {})
    calib = torch.randn(80, *input_size(model), generator=torch.Generator().manual_seed(0))
    config = SparsityConfig(2, 4, method="magnitude", compensate="bias", calib_macs=calib_macs)
    result = sparsify(model, calib, config, input_shape=input_size(model))
    assert result.report["calibration_budget"] == {
        "images": 80,
        "read": read,
        "calib_macs": calib_macs,
    }
    assert result.report["calibration_images"] == read
    assert result.report["compensation"]["calibration_images"] == read
