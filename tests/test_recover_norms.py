"""Label-free recovery on the calibration images keeps the BatchNorm statistics (issue 11)."""

from __future__ import annotations

import copy

import torch
from test_prune_fixtures import input_size, make_model

from mpdeploy.prune.recover import RecoverConfig, recover


def _running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_recovery_on_calibration_images_freezes_batchnorm_statistics():
    teacher = make_model("test_efficientnet", {})
    student = copy.deepcopy(teacher)
    calib = torch.randn(8, *input_size(teacher)) * 3 + 2  # far from the norms' statistics
    before = _running_stats(student)
    config = RecoverConfig(epochs=1, batch_size=4, lr=0.0, progress=False, eval_images=4)
    result = recover(student, teacher, calib, {}, config)
    assert result.record["norms_frozen"] is True
    assert result.record["norms_reestimated"] == 0  # never on calibration crops
    for name, value in _running_stats(result.model).items():
        torch.testing.assert_close(value, before[name], msg=name)
    # asked for explicitly, the statistics move
    moved = recover(
        copy.deepcopy(teacher),
        teacher,
        calib,
        {},
        RecoverConfig(**{**config.__dict__, "freeze_norms": False}),
    )
    assert moved.record["norms_frozen"] is False
    assert any(not torch.equal(v, before[k]) for k, v in _running_stats(moved.model).items())


def test_batches_under_sixteen_images_reestimate_then_freeze_batchnorm_statistics(tmp_path):
    """A labelled folder small enough for batch 8 trains with frozen statistics (the batch
    statistics of 8 images are too noisy, docs/accuracy.md "More steps per epoch"), re-estimated
    on the folder first so a cut that made them stale is repaired; `reestimate_norms=False` keeps
    them exactly; a batch of 16 updates them in training and re-estimates nothing."""
    from mpdeploy.data.digits import write_image_folder
    from mpdeploy.models import data_config_for

    teacher = make_model("test_efficientnet", {})
    folder = write_image_folder("test", tmp_path / "digits")  # 360 images: batch 8
    data_config = data_config_for(teacher, input_size(teacher)[-1])
    quick = dict(epochs=1, max_steps=2, eval_images=4, progress=False, lr=0.0, hflip=0.0)
    before = _running_stats(teacher)
    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
    small = recover(copy.deepcopy(teacher), teacher, folder, data_config, RecoverConfig(**quick))
    assert small.record["batch_size"] == 8 and small.record["norms_frozen"] is True
    assert small.record["norms_reestimated"] == norms > 0
    after = _running_stats(small.model)
    assert all(not torch.equal(after[k], before[k]) for k in before if "running_mean" in k)
    kept = recover(
        copy.deepcopy(teacher),
        teacher,
        folder,
        data_config,
        RecoverConfig(**quick, reestimate_norms=False),
    )
    assert kept.record["norms_frozen"] is True and kept.record["norms_reestimated"] == 0
    for name, value in _running_stats(kept.model).items():
        torch.testing.assert_close(value, before[name], msg=name)
    large = recover(
        copy.deepcopy(teacher), teacher, folder, data_config, RecoverConfig(**quick, batch_size=16)
    )
    assert large.record["norms_frozen"] is False and large.record["norms_reestimated"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in _running_stats(large.model).items())


def test_reestimate_norms_is_the_cumulative_average_of_the_batch_statistics():
    """100 images: batches of 64 and 36; each BatchNorm's running mean is the mean of the two
    batches' channel means and its running variance the mean of their unbiased variances, by
    hand; momentum and training mode are given back; a network without BatchNorm is untouched."""
    from mpdeploy.prune.recover import TensorImages, reestimate_norms

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU())
    model.train()
    images = torch.randn(100, 3, 8, 8) * 2 + 1
    set_ = TensorImages(images)
    assert reestimate_norms(model, set_, 1000, 0, torch.device("cpu")) == 1
    with torch.no_grad():
        out = conv(images).double()  # the subset is sorted: batches are images 0-63, 64-99
    means = [b.mean((0, 2, 3)) for b in (out[:64], out[64:])]
    variances = [
        b.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for b in (out[:64], out[64:])
    ]
    norm = model[1]
    torch.testing.assert_close(norm.running_mean.double(), sum(means) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var.double(), sum(variances) / 2, rtol=1e-5, atol=1e-6)
    assert norm.momentum == 0.3 and model.training and norm.training
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm([4, 6, 6]))
    state = copy.deepcopy(plain.state_dict())
    assert reestimate_norms(plain, set_, 1000, 0, torch.device("cpu")) == 0
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
