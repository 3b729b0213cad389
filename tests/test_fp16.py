"""The fp16 ONNX variant: fp32 at the boundary and in norms/softmax, fp16 elsewhere, and outputs
within the fp16 parity tolerances of the fp32 PyTorch model on real calibration images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mpdeploy.data.calibration import load_calibration
from mpdeploy.errors import UserError
from mpdeploy.export import export_onnx
from mpdeploy.export.fp16 import FP32_OPS, _toposort, convert_fp16, precision_summary
from mpdeploy.models import create_model
from mpdeploy.verify.parity import TOLERANCES

MODELS = ("test_vit", "test_convnext", "test_resnet")
TOL = TOLERANCES["fp16"]


def _convert(model_name: str, weights: str, tmp_path_factory):
    torch.manual_seed(0)
    loaded = create_model(model_name, weights)
    folder = tmp_path_factory.mktemp(model_name)
    input_shape = tuple(int(v) for v in loaded.data_config["input_size"])
    export_onnx(loaded.model, folder / "model.onnx", input_shape)
    out = convert_fp16(folder / "model.onnx", folder / "model.fp16.onnx")
    calib = load_calibration("builtin", 64, loaded.data_config, model_name=loaded.spec.timm_name)
    with torch.inference_mode():
        reference = loaded.model(calib.images).double().numpy()
    return out, calib.images.numpy(), reference


@pytest.fixture(scope="module", params=MODELS)
def converted(request, tmp_path_factory):
    return _convert(request.param, "none", tmp_path_factory)


def _run(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images.astype(np.float32)})[0].astype(np.float64)


def _assert_fp16_parity(path, images, reference):
    got = _run(path, images)
    diff = np.abs(got - reference)
    rel = diff / np.maximum(np.abs(reference), 1e-12)
    # Polygraphy's elementwise rule, as verify uses it: fail only where both limits are exceeded.
    failing = (diff > TOL["atol"]) & (rel > TOL["rtol"])
    assert not failing.any(), f"max abs error {diff.max():.3g}"
    top1 = float((got.argmax(1) == reference.argmax(1)).mean())
    assert top1 >= TOL["min_top1_agreement"]
    return diff.max(), top1


def test_fp16_matches_fp32_torch_on_calibration_images(converted):
    path, images, reference = converted
    worst, _ = _assert_fp16_parity(path, images, reference)
    # fp16 really happened: not bit-identical to fp32 ONNX Runtime (which matches torch to ~1e-6)
    assert worst > 1e-6


def test_boundary_is_fp32_and_overflow_prone_ops_stay_fp32(converted):
    path, *_ = converted
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    summary = precision_summary(model)
    assert not set(summary["fp16"]) & set(FP32_OPS), summary
    heavy = {"MatMul", "Conv", "Gemm"}
    assert set(summary["fp16"]) & heavy, summary
    assert not set(summary["fp32"]) & heavy, summary
    fp16_weights = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert fp16_weights >= len(model.graph.initializer) // 2
    onnx.checker.check_model(model, full_check=True)


def test_bundled_demo_model(tmp_path_factory):
    from mpdeploy.models.demo import demo_weights_path

    if not demo_weights_path().is_file():
        pytest.skip(f"the bundled demo weights are not in this checkout ({demo_weights_path()})")
    path, images, reference = _convert("demo", "hub", tmp_path_factory)
    _assert_fp16_parity(path, images, reference)


def test_demo_architecture_random_weights(tmp_path_factory):
    path, images, reference = _convert("demo", "none", tmp_path_factory)
    _assert_fp16_parity(path, images, reference)


def test_missing_input_is_one_line_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert_fp16(tmp_path / "absent.onnx", tmp_path / "out.fp16.onnx")
    assert list(tmp_path.iterdir()) == []


def test_toposort_restores_producer_before_consumer_order():
    from onnx import helper

    nodes = [
        helper.make_node("Relu", ["b"], ["c"], name="second"),
        helper.make_node("Cast", ["a"], ["b"], to=10, name="first"),
        helper.make_node("Relu", ["c"], ["d"], name="third"),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    _toposort(graph)
    assert [n.name for n in graph.node] == ["first", "second", "third"]


@pytest.mark.slow
def test_pipeline_fp16_onnxruntime_end_to_end(tmp_path):
    from mpdeploy.fileio import read_json
    from mpdeploy.pipeline import BuildOptions, build

    out = tmp_path / "vit-fp16"
    result = build(
        BuildOptions(
            model="test_vit",
            weights="none",
            precision="fp16",
            out=str(out),
            calib_size=16,
            max_batch=4,
            bench_iterations=2,
        ),
        progress=False,
    )
    engine = read_json(out / "engine" / "engine.json")
    assert engine["precision"] == "fp16"
    assert engine["artifact"] == "model.fp16.onnx"
    report = read_json(out / "parity" / "report.json")
    assert report["verdict"] == "pass"
    assert report["tolerances"] == TOL
    assert result.headline["parity"] == "pass"
    assert result.headline["bench_comparison"] == "no pruning"
    assert result.headline["speedup_median"] == 1.0
