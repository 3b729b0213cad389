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
