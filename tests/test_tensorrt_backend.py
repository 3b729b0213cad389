"""TensorRT backend: every decision that does not need TensorRT, plus GPU-gated real builds."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpdeploy.backends import EngineOptions, get_backend
from mpdeploy.backends import tensorrt as trt_backend
from mpdeploy.backends.tensorrt import (
    ELIGIBLE_MARKER,
    PICKED_MARKER,
    TensorRTBackend,
    capture_polygraphy_log,
    choose_precision_strategy,
    parse_sparsity_log,
    profile_shapes,
    sparse_tactic_layers,
    tensorrt_unavailable_reason,
)
from mpdeploy.errors import MissingDependencyError, UserError

TRT_REASON = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(
    TRT_REASON is not None, reason=f"TensorRT is not available: {TRT_REASON}"
)


# --- batch profile ----------------------------------------------------------------------------


def test_profile_spans_batch_one_to_max_batch():
    shapes = profile_shapes([3, 224, 224], EngineOptions(max_batch=32))
    assert shapes == {"min": (1, 3, 224, 224), "opt": (32, 3, 224, 224), "max": (32, 3, 224, 224)}


def test_profile_uses_opt_batch_when_given():
    shapes = profile_shapes((3, 160, 160), EngineOptions(max_batch=64, opt_batch=8))
    assert shapes["opt"] == (8, 3, 160, 160)
    assert shapes["max"] == (64, 3, 160, 160)


def test_profile_rejects_opt_above_max():
    with pytest.raises(UserError, match="opt"):
        profile_shapes((3, 32, 32), EngineOptions(max_batch=4, opt_batch=8))


# --- precision by TensorRT version ------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "fp16_flag", "strong_flag", "precision", "expected"),
    [
        # TensorRT 11: no FP16 flag; strongly typed from the fp16 ONNX, the creation flag only
        # where it is still exported.
        ("11.4.0.106", False, True, "fp16", ("model.fp16.onnx", True, True, False)),
        ("11.4.0.106", False, False, "fp16", ("model.fp16.onnx", True, False, False)),
        # an 11.x build that still exports FP16 is treated as 11.x all the same
        ("11.0.0", True, True, "fp16", ("model.fp16.onnx", True, True, False)),
        # TensorRT 10: strong typing exists, so the same build as 11.x (no FP16 flag)
        ("10.9.0.34", True, True, "fp16", ("model.fp16.onnx", True, True, False)),
        ("10.0.1", True, True, "fp32", ("model.onnx", True, True, False)),
        # no FP16 attribute at all (whatever the version says): strongly typed
        ("10.3.0", False, True, "fp16", ("model.fp16.onnx", True, True, False)),
        # only without strong typing: the weakly typed FP16 builder flag
        ("8.6.1", True, False, "fp16", ("model.fp16.onnx", False, False, True)),
        ("8.6.1", True, False, "fp32", ("model.onnx", False, False, False)),
    ],
)
def test_precision_strategy_by_version(version, fp16_flag, strong_flag, precision, expected):
    strategy = choose_precision_strategy(
        version, fp16_flag, precision=precision, has_strongly_typed_flag=strong_flag
    )
    got = (
        strategy.onnx,
        strategy.strongly_typed,
        strategy.request_strongly_typed_flag,
        strategy.fp16_flag,
    )
    assert got == expected
    assert version in strategy.reason


def test_precision_strategy_never_sets_fp16_flag_without_the_attribute():
    for version in ("10.0.0", "10.13.2", "11.0.0", "11.4.0"):
        assert not choose_precision_strategy(version, False).fp16_flag


def test_precision_strategy_rejects_unknown_precision():
    with pytest.raises(UserError, match="fp32 or fp16"):
        choose_precision_strategy("10.9.0", True, precision="int8")


# --- the sparsity lines of the build log ------------------------------------------------------
# Built from the message format TensorRT documents (developer guide, "Structured Sparsity":
# `[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3`
# and `... (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3`),
# with fused-layer names written as TensorRT prints them ("Conv_1 + Relu_2", NVIDIA/TensorRT#4054).


def test_parse_documented_trtexec_lines():
    text = (
        "[03/23/2021-00:14:05] [I] [TRT] Some other message\n"
        f"[03/23/2021-00:14:05] [I] [TRT] {ELIGIBLE_MARKER} conv1, conv2, conv3\n"
        f"[03/23/2021-00:14:05] [I] [TRT] {PICKED_MARKER} conv2, conv3\n"
    )
    assert parse_sparsity_log(text) == {
        "eligible": ["conv1", "conv2", "conv3"],
        "picked": ["conv2", "conv3"],
    }


def test_parse_fused_names_and_empty_picked_list():
    text = (
        f"[V] {ELIGIBLE_MARKER} /blocks.0/mlp/fc1/MatMul, Conv_7 + Add_9 + Relu_10, Gemm_12\n"
        f"[V] {PICKED_MARKER}\n"
    )
    assert parse_sparsity_log(text) == {
        "eligible": ["/blocks.0/mlp/fc1/MatMul", "Conv_7 + Add_9 + Relu_10", "Gemm_12"],
        "picked": [],
    }


def test_parse_without_sparsity_lines_and_repeated_lines():
    assert parse_sparsity_log("[I] Building engine\n[I] done\n") == {"eligible": [], "picked": []}
    twice = f"{ELIGIBLE_MARKER} a, b\n{ELIGIBLE_MARKER} b, c\n"
    assert parse_sparsity_log(twice)["eligible"] == ["a", "b", "c"]


def test_capture_collects_trt_messages_silently_and_restores_the_logger(capsys):
    from polygraphy.logger import G_LOGGER

    before = (G_LOGGER.module_severity.get(None), G_LOGGER.use_python_logging_system)
    with capture_polygraphy_log() as lines:
        # Polygraphy's TensorRT logger forwards INFO to verbose() and VERBOSE to extra_verbose()
        G_LOGGER.verbose(f"{ELIGIBLE_MARKER} Conv_1 + Relu_2, MatMul_5")
        G_LOGGER.extra_verbose(f"{PICKED_MARKER} Conv_1 + Relu_2")
    printed = capsys.readouterr().out
    assert ELIGIBLE_MARKER not in printed and PICKED_MARKER not in printed
    assert parse_sparsity_log("\n".join(lines)) == {
        "eligible": ["Conv_1 + Relu_2", "MatMul_5"],
        "picked": ["Conv_1 + Relu_2"],
    }
    assert (G_LOGGER.module_severity.get(None), G_LOGGER.use_python_logging_system) == before


def test_inspector_sparse_tactics_from_layer_json():
    info = {
        "Layers": [
            {"Name": "conv1", "TacticName": "sm80_xmma_fprop_sparse_conv_f16f16_f32"},
            {"Name": "fc", "TacticName": "sm80_xmma_gemm_f16f16_f32"},
            "a layer described only by name",
        ]
    }
    assert sparse_tactic_layers(info) == ["conv1"]
    assert sparse_tactic_layers({}) == []


# --- availability: one clear line -------------------------------------------------------------


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is usable here")
def test_missing_tensorrt_is_one_line():
    assert "\n" not in TRT_REASON
    assert TRT_REASON.startswith(
        ("TensorRT is not installed", "TensorRT's libraries", "TensorRT could not", "TensorRT ")
    )
    assert TensorRTBackend().unavailable_reason() == TRT_REASON
    with pytest.raises(MissingDependencyError, match="--backend tensorrt is not available here"):
        get_backend("tensorrt")
    backend = get_backend("tensorrt", require_available=False)
    with pytest.raises(MissingDependencyError):
        backend.build("model.onnx", ".", EngineOptions())


def test_libraries_missing_names_the_library(monkeypatch):
    # What `import tensorrt` raises with the bindings wheel but no libs wheel (measured with
    # tensorrt-cu13-bindings 11.4.0.106 on this machine).
    def broken():
        raise ImportError(
            "libnvonnxparser.so.11: cannot open shared object file: No such file or directory",
            name="tensorrt",
        )

    monkeypatch.setattr(trt_backend, "tensorrt_version", broken)
    reason = tensorrt_unavailable_reason()
    assert reason.startswith("TensorRT's libraries could not be loaded: libnvonnxparser.so.11")
    assert "\n" not in reason


def test_not_installed_message(monkeypatch):
    def absent():
        raise ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt")

    monkeypatch.setattr(trt_backend, "tensorrt_version", absent)
    assert tensorrt_unavailable_reason() == (
        "TensorRT is not installed (pip install 'mpdeploy[tensorrt]' on a machine with an "
        "NVIDIA GPU)"
    )


def test_no_gpu_and_old_version_messages(monkeypatch):
    import mpdeploy.hardware

    monkeypatch.setattr(trt_backend, "tensorrt_version", lambda: "10.9.0.34")
    monkeypatch.setattr(mpdeploy.hardware, "gpu_devices", lambda: ())
    assert (
        tensorrt_unavailable_reason()
        == "TensorRT 10.9.0.34 is installed but no CUDA GPU is visible"
    )
    monkeypatch.setattr(trt_backend, "tensorrt_version", lambda: "8.6.1")
    assert "too old" in tensorrt_unavailable_reason()


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is usable here")
def test_cli_build_backend_tensorrt_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from mpdeploy.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "build"
    code = main(["build", "--backend", "tensorrt", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == MissingDependencyError.exit_code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0] == f"mpdeploy: error: --backend tensorrt is not available here: {TRT_REASON}"
    assert "Traceback" not in captured.err + captured.out
    assert list(tmp_path.iterdir()) == []  # no build dir, no half-written sibling


# --- ONNX inspection (what the build reads from the graph) -------------------------------------


def _tiny_classifier(path):
    import numpy as np

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype("float32"), "w")
    fc = numpy_helper.from_array(rng.standard_normal((8, 5)).astype("float32"), "fc")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["c"], ["p"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["p", "fc"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [weight, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_onnx_io_reads_names_shapes_and_fp16(tmp_path):
    from mpdeploy.export.fp16 import convert_fp16

    fp32 = _tiny_classifier(tmp_path / "model.onnx")
    io = trt_backend._onnx_io(fp32)
    assert io == {
        "input_name": "input",
        "output_name": "logits",
        "input_shape": (3, 8, 8),
        "num_classes": 5,
        "has_fp16": False,
    }
    fp16 = convert_fp16(fp32, tmp_path / "model.fp16.onnx")
    assert trt_backend._onnx_io(fp16)["has_fp16"] is True


# --- real TensorRT (GPU machines with TensorRT only) ------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize(("precision", "sparsity"), [("fp32", None), ("fp16", "2:4")])
def test_build_plan_and_run_it(tmp_path, precision, sparsity):
    import numpy as np
    import onnxruntime as ort

    from mpdeploy.export.fp16 import convert_fp16
    from mpdeploy.fileio import read_json
    from mpdeploy.verify.parity import TOLERANCES

    onnx_path = _tiny_classifier(tmp_path / "model.onnx")
    if precision == "fp16":
        onnx_path = convert_fp16(onnx_path, tmp_path / "model.fp16.onnx")
    backend = TensorRTBackend()
    options = EngineOptions(precision=precision, max_batch=4, sparsity=sparsity)
    record = backend.build(onnx_path, tmp_path, options)
    assert record.artifact == "engine/model.plan"
    assert (tmp_path / "engine" / "model.plan").stat().st_size == record.size_bytes
    assert (tmp_path / "engine" / "timing.cache").is_file()
    assert read_json(tmp_path / "engine" / "engine.json")["details"]["headline"]["trt_version"]
    assert record.details["profile_shapes"]["max"] == [4, 3, 8, 8]
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with backend.runner(record, tmp_path) as runner:
        got = runner.infer({"input": x})["logits"]
    ref = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input": x})[0]
    tol = TOLERANCES[precision]
    assert np.allclose(got, ref, atol=tol["atol"], rtol=tol["rtol"])
    # a second build reuses (loads) the timing cache it saved
    backend.build(onnx_path, tmp_path, options)
