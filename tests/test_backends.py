"""The backend registry and what each backend owns: CLI choices, precision/device checks, Triton
serving (checked against Triton's own schema), ONNX Runtime's CUDA and TensorRT providers."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpdeploy.backends import (
    Backend,
    EngineOptions,
    EngineRecord,
    TritonServing,
    all_precisions,
    backend_names,
    get_backend,
    read_engine_record,
)
from mpdeploy.backends.onnxruntime import provider_list, provider_unavailable_reason
from mpdeploy.errors import MissingDependencyError, UserError

CUDA_EP_REASON = provider_unavailable_reason("cuda")
TRT_EP_REASON = provider_unavailable_reason("tensorrt")


def _record(backend="onnxruntime", precision="fp32", **details):
    return EngineRecord(
        backend=backend,
        precision=precision,
        onnx="model.onnx",
        artifact="model.onnx" if backend != "openvino" else "engine/model.xml",
        max_batch=8,
        profile={"min": 1, "opt": 8, "max": 8},
        input_name="input",
        output_name="logits",
        input_shape=[3, 32, 32],
        num_classes=10,
        build_seconds=0.0,
        size_bytes=1,
        details=details,
        device="cuda" if details.get("provider") in ("cuda", "tensorrt") else "cpu",
    )


# --- registry ---------------------------------------------------------------------------------


def test_cli_choices_derive_from_the_registry(monkeypatch):
    from mpdeploy.backends import base
    from mpdeploy.cli import cli

    assert set(backend_names()) == {"onnxruntime", "openvino", "tensorrt"}
    params = {p.name: p for p in cli.commands["build"].params}
    assert tuple(params["backend"].type.choices) == backend_names()
    assert tuple(params["precision"].type.choices) == all_precisions() == ("fp32", "fp16", "bf16")

    class EchoBackend(Backend):  # a plug-in: registering it is all it takes
        name = "echo"
        precisions = ("fp32",)

        def build(self, onnx_path, build_dir, options):
            raise NotImplementedError

        def runner(self, record, build_dir, name=None):
            raise NotImplementedError

        def triton(self, record):
            return TritonServing("python", "KIND_CPU", "model.py")

    monkeypatch.setitem(base._REGISTRY, "echo", EchoBackend)
    assert "echo" in backend_names() and isinstance(get_backend("echo"), EchoBackend)
    with pytest.raises(UserError, match="unknown backend 'nope': choose one of onnxruntime"):
        get_backend("nope")


@pytest.mark.parametrize(
    ("backend", "options", "message"),
    [
        ("openvino", EngineOptions(precision="fp16"), "supports --precision fp32 or bf16"),
        ("onnxruntime", EngineOptions(precision="bf16"), "supports --precision fp32 or fp16"),
        ("openvino", EngineOptions(device="cuda"), "runs on --device cpu"),
        ("onnxruntime", EngineOptions(provider="tensorrt"), "--ort-provider tensorrt needs"),
    ],
)
def test_unsupported_combinations_are_one_line_user_errors(backend, options, message):
    with pytest.raises(UserError, match=message) as info:
        get_backend(backend, require_available=False).check(options)
    assert not isinstance(info.value, MissingDependencyError)
    assert "\n" not in str(info.value)


def test_each_backend_names_its_source_onnx():
    ort = get_backend("onnxruntime", require_available=False)
    assert ort.source_onnx(EngineOptions(precision="fp16")) == "model.fp16.onnx"
    trt_ep = EngineOptions(precision="fp16", device="cuda", provider="tensorrt")
    assert ort.source_onnx(trt_ep) == "model.onnx"  # trt_fp16_enable lowers it itself
    assert get_backend("openvino", require_available=False).source_onnx(
        EngineOptions(precision="bf16")
    ) == ("model.onnx")
    tensorrt = get_backend("tensorrt", require_available=False)
    assert tensorrt.source_onnx(EngineOptions(precision="fp16")) == "model.fp16.onnx"


def test_engine_record_reads_old_and_partial_engine_json():
    record = _record()
    payload = record.to_dict()
    payload.pop("device")  # written before devices existed
    assert EngineRecord.from_dict({**payload, "future_field": 1}).device == "cpu"
    partial = EngineRecord.from_dict({"backend": "openvino", "precision": "bf16"}, partial=True)
    assert partial.details == {} and partial.max_batch is None


# --- Triton serving, per backend --------------------------------------------------------------


def _config(serving: TritonServing):
    from mpdeploy.serving.config import build_config, config_text, parse_config
    from mpdeploy.serving.tensors import TensorSpec

    config = build_config(
        "m",
        serving.kind,
        [TensorSpec("input", "TYPE_FP32", (-1, 3, 32, 32))],
        [TensorSpec("logits", "TYPE_FP32", (-1, 10))],
        max_batch_size=8,
        instance_kind=serving.instance_kind,
        instance_count=1,
        parameters=serving.parameters,
        gpu_accelerators=serving.gpu_accelerators,
    )
    return parse_config(config_text(config))  # Triton's schema accepts what we print


def test_triton_serving_of_each_engine_kind():
    ort, ov, trt = (get_backend(n, require_available=False) for n in backend_names())
    cpu = ort.triton(_record(provider="cpu"))
    assert (cpu.kind, cpu.instance_kind, cpu.python_runner) == (
        "onnxruntime_onnx",
        "KIND_CPU",
        "onnxruntime",
    )
    cuda = ort.triton(_record(provider="cuda"))
    assert cuda.instance_kind == "KIND_GPU" and cuda.gpu_accelerators == ()
    assert cuda.python_runner is None  # the python variant runs on the CPU only
    openvino = ov.triton(_record("openvino", "bf16", ir_weights="engine/model.bin"))
    assert (openvino.kind, openvino.model_file, openvino.extra_files) == (
        "openvino",
        "model.xml",
        ("engine/model.bin",),
    )
    assert openvino.parameters["INFERENCE_PRECISION_HINT"] == "bf16"
    plan = trt.triton(_record("tensorrt", tensorrt_version="10.13.0", gpu="NVIDIA H100"))
    assert (plan.kind, plan.instance_kind, plan.model_file) == (
        "tensorrt_plan",
        "KIND_GPU",
        "model.plan",
    )
    assert plan.parameters == {
        "mpdeploy_tensorrt_version": "10.13.0",
        "mpdeploy_gpu_name": "NVIDIA H100",
    }
    with pytest.raises(UserError, match="cannot be locked"):
        trt.triton(_record("tensorrt"))


def test_ort_tensorrt_provider_config_has_execution_accelerators():
    serving = get_backend("onnxruntime", require_available=False).triton(
        _record(precision="fp16", provider="tensorrt")
    )
    config = _config(serving)
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16"}


def test_openvino_config_names_the_backend_and_its_precision():
    serving = get_backend("openvino", require_available=False).triton(
        _record("openvino", "fp32", intra_op_threads=2)
    )
    config = _config(serving)
    assert config.backend == "openvino" and not config.platform
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "2"}


# --- ONNX Runtime execution providers ---------------------------------------------------------


def test_tensorrt_provider_options_keep_caches_in_the_build_dir(tmp_path):
    providers = provider_list(
        "tensorrt",
        precision="fp16",
        sparsity="2:4",
        cache_dir=tmp_path / "engine" / "ort_trt_cache",
        input_name="input",
        input_shape=(3, 224, 224),
        profile={"min": 1, "opt": 8, "max": 64},
    )
    (name, trt), (cuda, _), cpu = providers
    assert (name, cuda, cpu) == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert trt["trt_fp16_enable"] and trt["trt_sparsity_enable"]
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert Path(trt["trt_engine_cache_path"]) == tmp_path / "engine" / "ort_trt_cache"
    assert trt["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert trt["trt_profile_max_shapes"] == "input:64x3x224x224"
    fp32 = provider_list("tensorrt")[0][1]
    assert not fp32["trt_fp16_enable"] and not fp32["trt_sparsity_enable"]
    assert provider_list("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert provider_list("cpu") == ["CPUExecutionProvider"]


@pytest.mark.skipif(CUDA_EP_REASON is None, reason="ONNX Runtime's CUDA provider works here")
@pytest.mark.parametrize("extra", [[], ["--ort-provider", "tensorrt"]])
def test_cuda_provider_absent_is_one_line_exit_4(tmp_path, monkeypatch, capsys, extra):
    from mpdeploy.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["build", "--device", "cuda", *extra, "--out", "b", "--quiet"])
    captured = capsys.readouterr()
    assert code == MissingDependencyError.exit_code == 4
    (line,) = captured.err.strip().splitlines()
    reason = TRT_EP_REASON if extra else CUDA_EP_REASON
    assert line == f"mpdeploy: error: --backend onnxruntime is not available here: {reason}"
    assert "onnxruntime-gpu" in line or "no CUDA GPU" in line
    assert list(tmp_path.iterdir()) == []


def test_provider_on_cpu_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    from mpdeploy.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["build", "--ort-provider", "tensorrt", "--out", "b", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["mpdeploy: error: --ort-provider tensorrt needs --device cuda"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(
    CUDA_EP_REASON is not None, reason=f"needs ORT's CUDA provider: {CUDA_EP_REASON}"
)
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_ort_gpu_providers_build_verify_and_publish(tmp_path, provider):
    if provider == "tensorrt" and TRT_EP_REASON:
        pytest.skip(f"needs ORT's TensorRT provider: {TRT_EP_REASON}")
    from mpdeploy.pipeline import BuildOptions, build
    from mpdeploy.serving import check_repository

    out = tmp_path / "b"
    result = build(
        BuildOptions(
            model="test_vit",
            weights="none",
            device="cuda",
            ort_provider=provider,
            calib_size=8,
            max_batch=4,
            bench_batches=(1, 4),
            bench_iterations=3,
            out=str(out),
            triton_repo=str(tmp_path / "repo"),
        ),
        progress=False,
    )
    engine = read_engine_record(out)
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    assert engine.device == "cuda" and engine.details["providers"][0] == wanted
    assert result.headline["parity"] == "pass"
    if provider == "tensorrt":
        assert any((out / "engine" / "ort_trt_cache").iterdir())
    assert check_repository(tmp_path / "repo") == []
