"""Label-free recovery on the calibration photos draws fresh crops every epoch (issue 11): a fixed
set of crops of a few photos is memorised (docs/sparsity.md, "efficientnet-lite0, 2:4")."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from test_prune_fixtures import make_model

from mpdeploy.data.calibration import (
    PhotoCropStream,
    calibration_photos,
    load_calibration,
    random_crop,
)
from mpdeploy.models import data_config_for
from mpdeploy.pipeline import label_free_train_set
from mpdeploy.prune.recover import RecoverConfig, recover


def _photos(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8))
        for i in range(count)
    ]


CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3,
          "std": (0.5,) * 3, "crop_pct": 1.0}  # fmt: skip


def test_each_epoch_draws_new_crops_and_the_same_epoch_the_same_ones():
    stream = PhotoCropStream(_photos(2), CONFIG, length=4, seed=0)
    first = torch.stack([stream[i][0] for i in range(4)])
    assert first.shape == (4, 3, 32, 32) and stream[0][1] == -1  # no label
    assert torch.equal(first, torch.stack([stream[i][0] for i in range(4)]))  # reproducible
    stream.set_epoch(1)
    second = torch.stack([stream[i][0] for i in range(4)])
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_random_crop_keeps_the_builtin_calibration_crops():
    # _photo_crops now draws through random_crop: the builtin set must not have changed
    photo = _photos(1)[0]
    rng = np.random.default_rng(3)
    crop, where = random_crop(photo, rng)
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.25, 1.0)
    cw, ch = max(16, int(56 * np.sqrt(scale))), max(16, int(40 * np.sqrt(scale)))
    x, y = int(rng.integers(0, 56 - cw + 1)), int(rng.integers(0, 40 - ch + 1))
    assert where.startswith(f"crop({x},{y},{cw},{ch})") and crop.size == (cw, ch)


def test_label_free_recovery_streams_only_when_the_set_came_from_a_few_photos(tmp_path):
    builtin = load_calibration("builtin", 6, CONFIG)
    train, what = label_free_train_set(builtin, 6, CONFIG, seed=0)
    assert isinstance(train, PhotoCropStream) and len(train) == 6
    assert len(train.photos) == len(calibration_photos(builtin, 6)) >= 1
    assert "fresh random crops" in what
    for i, photo in enumerate(_photos(3)):
        photo.save(tmp_path / f"p{i}.png")
    few = load_calibration(str(tmp_path), 8, CONFIG)  # 3 photos for 8 asked: crops of them
    train, _ = label_free_train_set(few, 8, CONFIG, seed=0)
    assert isinstance(train, PhotoCropStream) and len(train.photos) == 3 and len(train) == 3
    enough = load_calibration(str(tmp_path), 3, CONFIG)  # as many images as asked: as before
    train, what = label_free_train_set(enough, 3, CONFIG, seed=0)
    assert torch.is_tensor(train) and train.shape[0] == 3 and "calibration images only" in what


def test_recovery_on_a_stream_records_it_and_moves_through_epochs():
    teacher = make_model("test_efficientnet", {})
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.conv_head.weight.mul_(0.5)
    config = data_config_for(teacher, 32)
    stream = PhotoCropStream(_photos(2), config, length=8, seed=0)
    result = recover(
        student, teacher, stream, config,
        RecoverConfig(epochs=2, batch_size=4, eval_images=4, progress=False, lr=1e-2),
    )  # fmt: skip
    record = result.record
    assert record["steps"] == 4 and stream.epoch == 1  # the second epoch drew its own crops
    assert record["train"] == "calibration" and record["norms_frozen"] is True
    assert record["photos"] == 2 and record["crops_per_epoch"] == 8
    assert result.headline["recover_data"].startswith("fresh random crops of the 2 calibration")
    assert not torch.equal(student.conv_head.weight, teacher.conv_head.weight * 0.5)
