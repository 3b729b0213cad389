"""Every error a user can cause: one line on stderr, non-zero exit, no traceback, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from mpdeploy.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    import re

    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpdeploy: error: ")
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def assert_nothing_written(root: Path):
    leftovers = [p for p in root.rglob("*") if p.is_dir() and ".partial" in p.name]
    assert not leftovers, leftovers
    assert not (root / "engines").exists() or not any((root / "engines").iterdir())


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
        (["--model", "test_vit", "--target-macs", "1.2"], r"--target-macs must be in \[0, 0.95\]"),
        (["--model", "test_vit", "--target-macs", "-0.1"], r"--target-macs must be in \[0, 0.95\]"),
        (["--model", "test_vit", "--sparsity", "5:4"], "need 0 < k < n ≤ 16"),
        (["--model", "test_vit", "--sparsity", "two:four"], "must look like k:n"),
        (["--model", "test_vit", "--sparsity", "2:32"], "need 0 < k < n ≤ 16"),
        (["--model", "test_vit", "--backend", "tensorrt"], "--backend tensorrt is not available"),
        (["--model", "test_vit", "--weights", "missing.safetensors"], "weights file not found"),
        (["--model", "test_vit", "--calib", "no_such_folder"], "calibration folder not found"),
        (["--model", "test_vit", "--compensate", "ols"], "unknown --compensate 'ols'"),
        (
            ["--model", "test_vit", "--compensate-inputs", "sideways"],
            "Invalid value for '--compensate-inputs'",
        ),
        (["--model", "test_vit", "--max-batch", "0"], "--max-batch must be at least 1"),
        (["--model", "test_vit", "--bogus-flag"], "No such option .--bogus-flag"),
    ],
)
def test_bad_build_input(in_tmp, capsys, argv, pattern):
    code, _, err = run_cli(capsys, "build", "--weights", "none", *argv)
    assert_one_line_error(code, err, pattern)
    assert_nothing_written(in_tmp)


def test_unreadable_and_mismatched_weights(in_tmp, capsys):
    (in_tmp / "junk.pth").write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "build", "--model", "test_vit", "--weights", "junk.pth")
    assert_one_line_error(code, err, "cannot read weights")
    import timm
    import torch

    torch.save(timm.create_model("test_resnet").state_dict(), in_tmp / "resnet.pth")
    code, _, err = run_cli(capsys, "build", "--model", "test_vit", "--weights", "resnet.pth")
    assert_one_line_error(code, err, "do not fit the model")
    assert_nothing_written(in_tmp)


def test_empty_calibration_folder(in_tmp, capsys):
    (in_tmp / "calib").mkdir()
    (in_tmp / "calib" / "readme.txt").write_text("no images here")
    code, _, err = run_cli(
        capsys, "build", "--model", "test_vit", "--weights", "none", "--calib", "calib"
    )
    assert_one_line_error(code, err, "no readable images in calib")
    assert_nothing_written(in_tmp)


def test_existing_output_needs_force(in_tmp, capsys):
    out = in_tmp / "engines" / "mine"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(
        capsys, "build", "--model", "test_vit", "--weights", "none", "--out", str(out)
    )
    assert_one_line_error(code, err, "already exists; pass --force")
    assert (out / "precious.txt").read_text() == "keep me"


def test_output_that_cannot_be_written(in_tmp, capsys):
    (in_tmp / "afile").write_text("x")
    code, _, err = run_cli(
        capsys, "build", "--model", "test_vit", "--weights", "none", "--out", "afile/sub/build"
    )
    assert_one_line_error(code, err, "cannot write to")
    assert (in_tmp / "afile").read_text() == "x"


def test_stage_command_on_a_folder_that_is_not_a_build(in_tmp, capsys):
    code, _, err = run_cli(capsys, "verify", "--build", str(in_tmp))
    assert_one_line_error(code, err, "not an mpdeploy build directory")


def test_console_script_reports_one_line(in_tmp):
    exe = Path(sys.executable).with_name("mpdeploy")
    if not exe.exists():
        pytest.skip("the mpdeploy console script is not installed in this environment")
    done = subprocess.run(
        [str(exe), "build", "--model", "nope_model"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--model", "test_byobnet", "--target-macs", "0.3"], "supported"),
        (["--model", "test_vit", "--target-macs", "0.3", "--calib-size", "1"], "calibration"),
        (["--model", "test_vit", "--sparsity", "16:17"], "need 0 < k < n ≤ 16"),
        (
            ["--model", "test_vit", "--sparsity", "12:13"],
            "no layer of VisionTransformer can hold it",
        ),
        (
            ["--model", "test_vit", "--sparsity", "2:4", "--sparsity-dense", "blocks.9*"],
            "'blocks.9\\*' matches no Linear/Conv2d layer",
        ),
        (
            ["--model", "test_vit", "--sparsity", "2:4", "--sparsity-dense", "blocks.0\n.*"],
            "invalid --sparsity-dense 'blocks.0\\\\n.\\*': empty or control characters",
        ),
        (
            ["--model", "test_vit", "--sparsity-dense", "blocks.0.*"],
            "--sparsity-dense names layers to leave dense under --sparsity N:M",
        ),
    ],
)
def test_bad_pruning_input(in_tmp, capsys, argv, pattern):
    code, _, err = run_cli(capsys, "build", "--weights", "none", *argv)
    assert_one_line_error(code, err, pattern)
    assert_nothing_written(in_tmp)
