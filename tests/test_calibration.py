"""Calibration: seeded, preprocessed by the model's timm config, unreadable files counted."""

import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

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


# ── the builtin photo set: shipped, licensed, disjoint from the held-out photos ─────────────

# scikit-image photos the accuracy suite and scripts/lite0_photo_agreement.py score lite0 on
# (motorcycle_right: the other half of the test split's stereo pair)
HELD_OUT_STEMS = {"motorcycle_right"}


def _held_out_names() -> set[str]:
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import accuracy_suite
    import lite0_photo_agreement

    names = set(lite0_photo_agreement.HELD_OUT_PHOTOS)
    for split in accuracy_suite.PHOTO_SPLITS.values():
        names |= set(split)
    return names


def _thumbnail(image: Image.Image) -> np.ndarray:
    """A 24×24 gray thumbnail, zero mean and unit variance: survives resizing and re-encoding."""
    small = np.asarray(image.convert("L").resize((24, 24), Image.Resampling.BILINEAR), float)
    return (small - small.mean()) / (small.std() + 1e-6)


def test_builtin_photos_are_not_the_held_out_photos():
    from pathlib import Path

    held_out = _held_out_names()
    assert len(held_out) == 7
    stems = {Path(name).stem for name in held_out} | HELD_OUT_STEMS
    labels = [label for label, _ in builtin_photos()]
    assert len(labels) == 13 and len(set(labels)) == 13
    assert not {Path(label.split(":", 1)[1]).stem for label in labels} & stems


def test_builtin_photos_are_not_the_held_out_photos_by_content():
    from pathlib import Path

    held_out = _held_out_names()
    # By content too, since the bundled files are renamed copies: each photo (and its mirror
    # image) against each held-out photo. A held-out photo saved the way the bundled ones were
    # (≤ 512 px, JPEG 85) scores ≤ 0.012; the distinct photos here score ≥ 0.79.
    skimage = pytest.importorskip("skimage")
    root = Path(skimage.__file__).parent / "data"
    held = {name: _thumbnail(Image.open(root / name)) for name in sorted(held_out)}
    held["motorcycle_right"] = _thumbnail(Image.open(root / "motorcycle_right.png"))
    copy = Image.open(root / "chelsea.png").convert("L").resize((256, 171))
    assert np.abs(_thumbnail(copy) - held["chelsea.png"]).mean() < 0.2  # the check can fail
    for label, path in builtin_photos():
        photo = Image.open(path)
        for thumb in (_thumbnail(photo), _thumbnail(ImageOps.mirror(photo.convert("RGB")))):
            for name, other in held.items():
                assert np.abs(thumb - other).mean() > 0.4, (label, name)


def test_bundled_photos_ship_with_the_package_and_name_their_licence():
    import fnmatch
    from importlib.resources import files
    from pathlib import Path

    from mpdeploy.data.calibration import BUNDLED_PHOTOS

    root = files("mpdeploy") / "data" / "photos"
    readme = (root / "README.md").read_text()
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    for name in BUNDLED_PHOTOS:
        with Image.open(root / name) as image:  # from the installed package's own folder
            image.load()
            assert min(image.size) >= 160
        assert any(fnmatch.fnmatch(f"data/photos/{name}", p) for p in patterns["mpdeploy"])
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        assert any(word in row for word in ("CC0", "public domain", "no known copyright"))
    assert any(fnmatch.fnmatch("data/photos/README.md", p) for p in patterns["mpdeploy"])
    assert sum(len((root / name).read_bytes()) for name in BUNDLED_PHOTOS) < 600_000


def test_builtin_crops_are_seeded_and_name_their_photos(vit_config):
    a = load_calibration("builtin", 13, vit_config, seed=3)
    b = load_calibration("builtin", 13, vit_config, seed=3)
    assert torch.equal(a.images, b.images) and a.record() == b.record()
    assert a.record()["origin"] == "builtin:photos"
    photos = [source.split("#")[0] for source in a.record()["sources"]]
    labels = [label for label, _ in builtin_photos()]
    assert photos == labels  # round-robin: every photo once
    assert all(
        re.fullmatch(r"[a-z]+:[\w.]+#crop\(\d+,\d+,\d+,\d+\)(\+flip)?", s) for s in a.sources
    )
