"""The recovery recipe that makes one epoch count (issue 11): batch from the data size, no crop
jitter by default, weight EMA as an option, and a record that names the data."""

from __future__ import annotations

import copy

import torch
from test_prune_fixtures import make_model

from mpdeploy.data.digits import write_image_folder
from mpdeploy.models import data_config_for
from mpdeploy.prune.recover import RecoverConfig, recover, train_batch_size, train_transform

QUICK = dict(epochs=1, max_steps=3, eval_images=8, progress=False)


def test_batch_size_gives_an_epoch_enough_steps():
    config = RecoverConfig()
    assert train_batch_size(1137, config) == 8  # the suite's fit split: 142 steps, not 17
    assert train_batch_size(128, config) == 8  # calibration images: the smallest batch
    assert train_batch_size(100_000, config) == 64  # a large folder keeps the batch of 64
    assert train_batch_size(8192, config) == 64  # the smallest folder that does (128 steps)
    assert train_batch_size(8191, config) == 32
    assert train_batch_size(4096, config, world=2) == 16  # per process under DDP
    assert train_batch_size(100_000, RecoverConfig(batch_size=24)) == 24


def test_crop_scale_reaches_the_training_transform():
    data_config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    crop = train_transform(data_config, 0.0, (0.9, 1.0)).transforms[0]
    assert tuple(crop.scale) == (0.9, 1.0)
    assert tuple(train_transform(data_config, 0.0).transforms[0].scale) == (0.6, 1.0)


def test_default_recipe_on_a_labelled_folder_records_its_batch_and_data(tmp_path):
    teacher = make_model("mpdeploy_demo_vit", {})
    folder = write_image_folder("test", tmp_path / "digits")  # 360 images
    config = RecoverConfig(**QUICK)
    assert config.lr == 3e-4 and tuple(config.crop_scale) == (1.0, 1.0)
    result = recover(copy.deepcopy(teacher), teacher, folder, data_config_for(teacher, 32), config)
    assert result.record["batch_size"] == 8 and result.record["steps"] == 3
    assert result.headline["recover_data"] == "labelled image folder"


def test_ema_of_one_keeps_the_starting_weights():
    teacher = make_model("mpdeploy_demo_vit", {})
    start = copy.deepcopy(teacher)
    with torch.no_grad():  # a student unlike its teacher, so the loss has gradients
        start.head.weight.mul_(0.5)
    calib = torch.randn(16, 3, 32, 32)
    config = dict(QUICK, batch_size=4, lr=1e-2, warmup_fraction=0.0)
    kept = recover(copy.deepcopy(start), teacher, calib, {}, RecoverConfig(**config, ema=1.0))
    for (name, a), b in zip(
        kept.model.state_dict().items(), start.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    plain = recover(copy.deepcopy(start), teacher, calib, {}, RecoverConfig(**config))
    assert not torch.equal(plain.model.head.weight, start.head.weight)  # without EMA it moved
    assert plain.headline["recover_data"] == "calibration images (16, no labels)"
