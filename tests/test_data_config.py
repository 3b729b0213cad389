"""--img-size for CNNs, --data-config overrides, and the unsupported-model refusal at build start."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import assert_nothing_written, assert_one_line_error, run_cli

from mpdeploy.errors import UserError
from mpdeploy.models import create_model, read_data_config, require_prunable

CONFIG = {
    "input_size": [3, 40, 40],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "squash",
    "mean": [0.5, 0.25, 0.125],
    "std": [0.5, 0.5, 0.5],
}


def write(tmp_path, payload, name="cfg.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_a_cnn_runs_at_another_size_with_its_weights_untouched():
    loaded = create_model("test_resnet", "none", num_classes=10, img_size=32)
    assert loaded.spec.img_size == 32 and loaded.spec.model_kwargs == {}
    assert loaded.data_config["input_size"] == [3, 32, 32]
    with torch.no_grad():
        assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_data_config_overrides_what_timm_resolves(tmp_path):
    from PIL import Image

    from mpdeploy.data.calibration import eval_transform

    overrides = read_data_config(write(tmp_path, CONFIG))
    loaded = create_model("test_efficientnet", "none", data_config=overrides)
    assert loaded.spec.img_size == 40
    assert {k: loaded.data_config[k] for k in CONFIG} == CONFIG
    # the transform every stage builds from it: squash to 40×40, the file's mean and std
    x = eval_transform(loaded.data_config)(Image.new("RGB", (64, 32), (255, 0, 0)))
    assert x.shape == (3, 40, 40)
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.5, (0.0 - 0.125) / 0.5]
    assert x.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(UserError, match="disagrees with the data config's input_size"):
        create_model("test_efficientnet", "none", img_size=64, data_config=overrides)


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [
        ("{not json", "is not JSON"),
        ([1, 2], "must be a JSON object"),
        ({"input_size": [3, 32, 32], "resize": 1}, "unknown key.*resize"),
        ({"input_size": [1, 32, 32]}, r"must be \[3, S, S\]"),
        ({"input_size": [3, 32, 48]}, r"must be \[3, S, S\]"),
        ({"input_size": [3, 8, 8]}, r"S in \[16, 2048\]"),
        ({"interpolation": "cubic"}, "must be one of nearest"),
        ({"crop_mode": "middle"}, "must be one of center"),
        ({"crop_pct": 1.5}, r"must be a number in \(0, 1\]"),
        ({"mean": [0.5, 0.5]}, "must be a list of 3 numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "must be > 0"),
    ],
)
def test_bad_data_configs_are_one_line_errors(tmp_path, payload, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        read_data_config(write(tmp_path, payload))
    assert "\n" not in str(info.value)


def test_build_records_and_calibrates_with_the_effective_config(tmp_path):
    from mpdeploy.pipeline import BuildOptions, build

    opts = BuildOptions(
        model="test_resnet",
        weights="none",
        num_classes=10,
        data_config=str(write(tmp_path, {"input_size": [3, 48, 48], "mean": [0.1, 0.2, 0.3]})),
        calib_size=4,
        out=str(tmp_path / "build"),
    )
    result = build(opts, progress=False, stages=("resolve", "calibrate"))
    model = result.manifest["model"]
    assert model["input_shape"] == [3, 48, 48]
    assert model["data_config"]["mean"] == [0.1, 0.2, 0.3]
    assert model["data_config_overrides"] == {"input_size": [3, 48, 48], "mean": [0.1, 0.2, 0.3]}
    from mpdeploy.data.calibration import read_calibration

    assert tuple(read_calibration(result.build_dir).images.shape) == (4, 3, 48, 48)


def test_unsupported_model_is_refused_at_build_start_naming_the_families(in_tmp, capsys):
    code, _, err = run_cli(
        capsys, "build", "--model", "vgg11", "--weights", "none", "--target-macs", "0.5"
    )
    assert_one_line_error(code, err, r"no family for VGG; supported: vit .*efficientnet \(")
    assert_nothing_written(in_tmp)
    # a supported family with a block it cannot cut exactly names that module type
    with pytest.raises(UserError, match="GroupNormAct.*; supported: .*resnet") as info:
        require_prunable("test_efficientnet_gn")
    assert "\n" not in str(info.value)
    require_prunable("tf_efficientnet_lite0")  # accepted: no error


def test_bad_data_config_path_is_refused_before_any_work(in_tmp, capsys):
    code, _, err = run_cli(
        capsys, "build", "--model", "test_resnet", "--weights", "none", "--data-config", "x.json"
    )
    assert_one_line_error(code, err, "--data-config file not found: x.json")
    assert_nothing_written(in_tmp)
