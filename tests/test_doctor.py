"""`mpdeploy doctor`: machine facts, and the same TensorRT line `--backend tensorrt` gives."""

from __future__ import annotations

import json

import pytest

from mpdeploy.backends.tensorrt import tensorrt_unavailable_reason
from mpdeploy.doctor import diagnose, format_diagnosis
from mpdeploy.errors import MissingDependencyError
from mpdeploy.hardware import cpu_info, gpu_devices


@pytest.fixture(scope="module")
def diagnosis():
    return diagnose()


def test_diagnosis_is_json_with_the_expected_sections(diagnosis):
    json.dumps(diagnosis)
    for key in (
        "mpdeploy",
        "python",
        "cpu",
        "cpu_count",
        "versions",
        "torch_cuda",
        "gpus",
        "onnxruntime_providers",
        "tensorrt",
        "openvino",
        "backends",
        "triton",
    ):
        assert key in diagnosis
    assert diagnosis["versions"]["torch"] and diagnosis["versions"]["onnxruntime"]
    assert "CPUExecutionProvider" in diagnosis["onnxruntime_providers"]
    assert diagnosis["gpus"] == [dict(g) for g in gpu_devices()]
    assert diagnosis["cpu"]["flags"] == list(cpu_info().flags)


def test_backend_table_is_what_build_would_say(diagnosis):
    """Every registered backend × device × precision: None, or the exact refusal line."""
    from mpdeploy.backends import EngineOptions, backend_names, get_backend
    from mpdeploy.errors import UserError

    assert list(diagnosis["backends"]) == list(backend_names())
    assert diagnosis["backends"]["onnxruntime"]["cpu fp32"] is None
    for name, combos in diagnosis["backends"].items():
        for combo, reason in combos.items():
            device, precision = combo.split()
            options = EngineOptions(precision=precision, device=device)
            if reason is None:
                get_backend(name, require_available=False).check(options)
            else:
                with pytest.raises(UserError) as info:
                    get_backend(name, require_available=False).check(options)
                assert str(info.value) == reason
    ready = format_diagnosis(diagnosis).splitlines()[-1]
    assert ready.startswith("backends") and "onnxruntime cpu fp32" in ready


def test_tensorrt_line_is_what_the_backend_says(diagnosis):
    from mpdeploy.backends import get_backend

    trt = diagnosis["tensorrt"]
    reason = tensorrt_unavailable_reason()
    assert trt["reason"] == reason
    assert trt["usable"] is (reason is None)
    if reason is None:
        assert trt["backend_error"] is None
        return
    with pytest.raises(MissingDependencyError) as info:
        get_backend("tensorrt")
    assert trt["backend_error"] == str(info.value)
    assert trt["backend_error"] in format_diagnosis(diagnosis).splitlines()[5]


def test_triton_section_reports_client_and_server(diagnosis):
    import importlib.util

    triton = diagnosis["triton"]
    assert triton["tritonclient"] is (importlib.util.find_spec("tritonclient") is not None)
    assert triton["pytriton"] is (importlib.util.find_spec("pytriton") is not None)
    if triton["bundled_tritonserver"] is None:
        assert triton["server_reason"]


def test_format_is_one_aligned_row_per_fact(diagnosis):
    text = format_diagnosis(diagnosis)
    rows = text.splitlines()
    labels = [row.split("  ")[0].strip() for row in rows]
    for label in (
        "mpdeploy",
        "cpu",
        "gpu",
        "torch cuda",
        "onnxruntime",
        "tensorrt",
        "openvino",
        "triton server",
        "triton client",
        "backends",
    ):
        assert label in labels
    width = max(len(label) for label in labels)
    assert all(row[width : width + 2] == "  " and row[width + 2] != " " for row in rows)
    if not diagnosis["gpus"]:
        assert "none visible" in text


def test_cli_doctor(capsys):
    from mpdeploy.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt" in out and "onnxruntime" in out
