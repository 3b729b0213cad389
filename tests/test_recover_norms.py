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


def test_batches_under_sixteen_images_keep_batchnorm_statistics(tmp_path):
    """A labelled folder small enough for batch 8 trains with frozen statistics (the batch
    statistics of 8 images are too noisy, docs/accuracy.md "More steps per epoch"); a batch of 16
    updates them."""
    from mpdeploy.data.digits import write_image_folder
    from mpdeploy.models import data_config_for

    teacher = make_model("test_efficientnet", {})
    folder = write_image_folder("test", tmp_path / "digits")  # 360 images: batch 8
    data_config = data_config_for(teacher, input_size(teacher)[-1])
    quick = dict(epochs=1, max_steps=2, eval_images=4, progress=False, lr=0.0)
    before = _running_stats(teacher)
    small = recover(copy.deepcopy(teacher), teacher, folder, data_config, RecoverConfig(**quick))
    assert small.record["batch_size"] == 8 and small.record["norms_frozen"] is True
    for name, value in _running_stats(small.model).items():
        torch.testing.assert_close(value, before[name], msg=name)
    large = recover(
        copy.deepcopy(teacher), teacher, folder, data_config, RecoverConfig(**quick, batch_size=16)
    )
    assert large.record["norms_frozen"] is False
    assert any(not torch.equal(v, before[k]) for k, v in _running_stats(large.model).items())
