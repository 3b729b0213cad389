"""`--calib-refine` / `mpdeploy.data.refine`: calibration images moved towards the BatchNorm running statistics."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from mpdeploy.data.refine import refine_calibration, statistics_loss
from mpdeploy.errors import UserError


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    for norm in (model[1], model[4]):  # "training" statistics unlike those of the images below
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.2


def test_refine_lowers_the_mismatch_and_leaves_model_and_input_alone():
    model, x = small_cnn(), images()
    x_before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # its mode is restored afterwards
    model[0].weight.requires_grad_(False)  # and so are the parameters' flags
    refined, record = refine_calibration(model, x, 60, lr=0.05, batch_size=5)
    assert refined.shape == x.shape and not torch.equal(refined, x)
    assert torch.equal(x, x_before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert record.norms == 2 and record.steps == 60 and record.batch_size == 5
    assert record.loss_after < 0.5 * record.loss_before, record


def test_zero_steps_is_the_identity():
    model, x = small_cnn(), images()
    refined, record = refine_calibration(model, x, 0)
    assert torch.equal(refined, x)
    assert record.loss_after == record.loss_before > 0


def test_the_mismatch_is_zero_when_the_batch_has_the_running_statistics():
    """The objective is exact: a batch whose per-channel input mean and (biased) variance are the
    running ones scores 0, and one with a shifted channel mean scores the shift / √C / #norms."""
    from mpdeploy.data.refine import _NormStatistics, matched_norms

    model, x = small_cnn(), images()
    hooks = _NormStatistics(matched_norms(model))
    with torch.no_grad():
        for i in range(2):  # norm i's input depends on the running statistics of those before it
            statistics_loss(model, x, hooks)
            norm, mean, var = hooks.seen[i]
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
        assert float(statistics_loss(model, x, hooks)) < 1e-6
        model[4].running_mean[3] += 0.8  # one channel of the 16 of the second norm
        assert float(statistics_loss(model, x, hooks)) == pytest.approx(0.8 / 4 / 2, rel=1e-5)
    hooks.close()


def test_bad_requests_are_refused():
    with pytest.raises(UserError, match="no BatchNorm2d"):
        refine_calibration(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), images(), 5)
    with pytest.raises(UserError, match="≥ 0"):
        refine_calibration(small_cnn(), images(), -1)


def test_build_records_the_refined_calibration(tmp_path):
    from safetensors.torch import load_file

    from mpdeploy.data.calibration import read_calibration
    from mpdeploy.fileio import read_json
    from mpdeploy.pipeline import BuildOptions, build

    def run(refine: int, name: str):
        opts = BuildOptions(
            model="test_resnet",
            weights="none",
            calib_size=6,
            calib_refine=refine,
            out=str(tmp_path / name),
        )
        return build(opts, progress=False, stages=("resolve", "calibrate")).build_dir

    plain, refined = run(0, "plain"), run(3, "refined")
    record = read_json(refined / "calibration.json")
    assert "refined" not in read_json(plain / "calibration.json")
    assert record["refined"]["steps"] == 3 and record["refined"]["norms"] > 0
    assert record["refined"]["loss_after"] < record["refined"]["loss_before"]
    tensor = load_file(str(refined / "calibration.safetensors"))["images"]
    assert hashlib.sha256(tensor.numpy().tobytes()).hexdigest() == record["sha256"]
    before = read_calibration(plain).images
    assert tensor.shape == before.shape and not torch.equal(tensor, before)
    assert read_calibration(refined).refined == record["refined"]
