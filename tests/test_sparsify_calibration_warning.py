"""A data-aware N:M choice fitted to crops of a few photos is warned about (issue 11: on
efficientnet-lite0's real weights it overfits them; docs/sparsity.md, "efficientnet-lite0, 2:4")."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mpdeploy.data.calibration import load_calibration
from mpdeploy.models.demo import DEMO_MODEL
from mpdeploy.pipeline import narrow_calibration_warning

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3,
          "std": (0.5,) * 3, "crop_pct": 1.0}  # fmt: skip


def test_warned_for_data_aware_methods_on_a_few_photos_only(tmp_path):
    builtin = load_calibration("builtin", 6, CONFIG)
    for method in ("obs", "cast"):
        text = narrow_calibration_warning(method, builtin, 6)
        assert text and f"--sparsity-method {method}" in text and "magnitude" in text
        assert "obs_shrink (the default)" in text
    shrink = narrow_calibration_warning("obs_shrink", builtin, 6)  # the default: warned as well
    assert shrink and "--calib DIR" in shrink and "already leans on the weights" in shrink
    assert narrow_calibration_warning("magnitude", builtin, 6) is None  # data-free: nothing to say
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    few = load_calibration(str(tmp_path), 8, CONFIG)  # 3 photos for 8 asked: crops of them
    assert "only 3 photos" in narrow_calibration_warning("obs", few, 8)
    enough = load_calibration(str(tmp_path), 3, CONFIG)  # one image per calibration slot
    assert narrow_calibration_warning("obs", enough, 3) is None
    digits = load_calibration("builtin", 6, CONFIG, model_name=DEMO_MODEL)  # digit images
    assert narrow_calibration_warning("obs", digits, 6) is None
