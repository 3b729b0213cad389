"""Calibration: seeded, preprocessed by the model's timm config, unreadable files counted."""

import numpy as np
import pytest
from PIL import Image

from mpdeploy.data.calibration import builtin_photos, load_calibration
from mpdeploy.errors import UserError
from mpdeploy.models import create_model


@pytest.fixture(scope="module")
def vit_config():
    return create_model("test_vit", weights="none").data_config


def test_builtin_photos_are_real_and_seeded(vit_config):
    assert len(builtin_photos()) >= 2
    a = load_calibration("builtin", 12, vit_config, seed=0)
    b = load_calibration("builtin", 12, vit_config, seed=0)
    c = load_calibration("builtin", 12, vit_config, seed=1)
    assert a.images.shape == (12, *vit_config["input_size"])
    assert a.sha256 == b.sha256 and a.sources == b.sources
    assert a.sha256 != c.sha256
    # Normalised with the model's mean/std: roughly zero-centred, not raw [0, 1] pixels.
    assert -1.5 < float(a.images.mean()) < 1.5 and float(a.images.min()) < 0


def test_demo_calibrates_on_digits_train_split():
    loaded = create_model("demo")
    calib = load_calibration("builtin", 20, loaded.data_config, model_name=loaded.spec.timm_name)
    assert calib.origin == "builtin:digits"
    assert all(s.startswith("digits:train[") for s in calib.sources)
    assert calib.images.shape == (20, 3, 32, 32)


def test_folder_recursive_with_unreadable_files(tmp_path, vit_config):
    rng = np.random.default_rng(0)
    for i in range(5):
        sub = tmp_path / f"class{i % 2}" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    calib = load_calibration(str(tmp_path), 10, vit_config)
    assert len(calib) == 5
    assert calib.skipped == 1


def test_empty_or_unreadable_folder_is_an_error(tmp_path, vit_config):
    with pytest.raises(UserError, match="no readable images"):
        load_calibration(str(tmp_path), 4, vit_config)
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"no readable images .*1 unreadable"):
        load_calibration(str(tmp_path), 4, vit_config)
    with pytest.raises(UserError, match="not found"):
        load_calibration(str(tmp_path / "missing"), 4, vit_config)
