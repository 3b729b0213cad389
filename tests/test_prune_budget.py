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
    # label draws per image: what the score budget leaves once the images are chosen
    assert vit_b16["score_draws_budget"] == resnet50["score_draws_budget"] == 1
    assert small["score_draws_budget"] == 6e11 // (256 * 5_000_000) == 468
    lite0 = _split(128, 400_000_000)  # efficientnet-lite0's 0.4 GMACs, the suite's 128 crops
    assert lite0["score_draws_budget"] == 11
    assert _split(256, 1e13)["score_draws_budget"] == 1  # over budget already: still one draw
    assert _split(256, 1e9, score_macs=None)["score_draws_budget"] is None


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
    assert split["score_draws"] == 2  # mp_fisher_split: its two strata, whatever the budget
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
        "permutation": read,  # the channel energies read every image the stage reads
    }
    assert result.report["calibration_images"] == read
    assert result.report["compensation"]["calibration_images"] == read


@pytest.mark.parametrize(("score_macs", "draws"), [(0.0, 1), (None, 8), (3e8, 3)])
def test_mp_fisher_draws_takes_the_draws_the_budget_leaves(score_macs, draws):
    """Eight draws when the budget is open, one when the images already fill it, and in between
    ⌊score_macs / (images · dense MACs)⌋; the plan records how many it took, and each draw is
    one backward pass of the scored batch."""
    model = make_model("test_vit", {})
    calib = torch.randn(40, *input_size(model), generator=torch.Generator().manual_seed(0))
    from mpdeploy.prune.macs import count_macs

    dense = count_macs(model, (1, *input_size(model))).total_macs
    if score_macs:  # 3 draws' worth on the 40 images (the test model is tiny)
        score_macs = 40 * dense * 3.5
    backwards = []
    handle = model.register_full_backward_hook(lambda *args: backwards.append(1))
    try:
        config = PruneConfig(0.5, method="mp_fisher_draws", score_macs=score_macs)
        result = prune_model(model, calib, None, config)
    finally:
        handle.remove()
    assert result.plan["calibration"]["score_draws"] == draws
    batches = -(-result.plan["calibration"]["score_images"] // config.batch_size)
    assert len(backwards) == batches * (draws + 1)  # the draws, then taylor's order of heads
