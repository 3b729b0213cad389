"""ONNX Runtime backend: the CPU default, and on a GPU its CUDA or TensorRT execution provider
(`onnxruntime-gpu`). The engine is the checked ONNX file itself; the TensorRT provider keeps its
engine and timing caches inside the build directory (`engine/ort_trt_cache/`).

ONNX Runtime silently falls back to the CPU when a requested provider cannot load, so every
session checks that the provider it asked for is the one that runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mpdeploy.backends.base import (
    ENGINE_DIR,
    Backend,
    EngineOptions,
    EngineRecord,
    TritonServing,
    read_onnx_io,
    register_backend,
    write_engine_record,
)
from mpdeploy.errors import MissingDependencyError, UserError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
TRT_CACHE_DIR = "ort_trt_cache"  # inside engine/
GPU_INSTALL_HINT = "pip install onnxruntime-gpu in place of onnxruntime, on a machine with CUDA"


def provider_key(options: EngineOptions) -> str:
    """Which ONNX Runtime execution provider `options` ask for: cpu | cuda | tensorrt."""
    if options.device == "cpu":
        if options.provider not in (None, "cpu"):
            raise UserError(f"--ort-provider {options.provider} needs --device cuda")
        return "cpu"
    provider = options.provider or "cuda"
    if provider not in ("cuda", "tensorrt"):
        raise UserError(f"--ort-provider must be cuda or tensorrt (got {provider})")
    return provider


def provider_unavailable_reason(key: str) -> str | None:
    """None when ONNX Runtime here offers provider `key` and a GPU is visible, else one line."""
    if key == "cpu":
        return None
    import onnxruntime as ort

    from mpdeploy import hardware

    available = ort.get_available_providers()
    if PROVIDERS[key] not in available:
        return (
            f"ONNX Runtime {ort.__version__} has no {PROVIDERS[key]} (providers: "
            f"{', '.join(available)}; {GPU_INSTALL_HINT})"
        )
    if not hardware.gpu_devices():
        return f"ONNX Runtime offers {PROVIDERS[key]} but no CUDA GPU is visible"
    return None


def provider_list(
    key: str,
    *,
    precision: str = "fp32",
    sparsity: str | None = None,
    cache_dir: Path | None = None,
    input_name: str = "input",
    input_shape: tuple[int, ...] | list[int] = (),
    profile: dict[str, int] | None = None,
) -> list[Any]:
    """The `providers=` argument of an InferenceSession: the requested provider with its options,
    then the fallbacks ONNX Runtime needs for nodes the provider does not take."""
    if key == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    if key == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt: dict[str, Any] = {
        "device_id": 0,
        "trt_fp16_enable": precision == "fp16",
        "trt_sparsity_enable": sparsity == "2:4",
    }
    if cache_dir is not None:
        trt.update(
            trt_engine_cache_enable=True,
            trt_engine_cache_path=str(cache_dir),
            trt_timing_cache_enable=True,
            trt_timing_cache_path=str(cache_dir),
        )
    if profile and input_shape:
        dims = "x".join(str(int(d)) for d in input_shape)
        for key_name, batch in (
            ("min", profile["min"]),
            ("opt", profile["opt"]),
            ("max", profile["max"]),
        ):
            trt[f"trt_profile_{key_name}_shapes"] = f"{input_name}:{batch}x{dims}"
    return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    summary = "ONNX Runtime: CPU (default), or --device cuda with the CUDA/TensorRT provider"
    precisions = ("fp32", "fp16")
    devices = ("cpu", "cuda")

    def unavailable_reason(self, options: EngineOptions | None = None) -> str | None:
        return provider_unavailable_reason(provider_key(options or EngineOptions()))

    def check(self, options: EngineOptions) -> None:
        provider_key(options)
        super().check(options)

    def source_onnx(self, options: EngineOptions) -> str:
        # The TensorRT provider takes fp32 ONNX and lowers precision itself (trt_fp16_enable);
        # CPU and CUDA run fp16 from the graph that mpdeploy.export.fp16 wrote.
        if options.precision == "fp16" and provider_key(options) != "tensorrt":
            return "model.fp16.onnx"
        return "model.onnx"

    def build(self, onnx_path: Path, build_dir: Path, options: EngineOptions) -> EngineRecord:
        import onnxruntime as ort

        build_dir, onnx_path = Path(build_dir), Path(onnx_path)
        key = provider_key(options)
        reason = provider_unavailable_reason(key)
        if reason:
            raise MissingDependencyError(f"--backend onnxruntime is not available here: {reason}")
        io = read_onnx_io(onnx_path)
        details: dict[str, Any] = {
            "onnxruntime_version": ort.__version__,
            "provider": key,
            "intra_op_threads": options.threads,
            "input_type": "tensor(float)",
            "sparsity": options.sparsity,
        }
        if key == "tensorrt":
            cache = build_dir / ENGINE_DIR / TRT_CACHE_DIR
            cache.mkdir(parents=True, exist_ok=True)
            details["trt_cache_dir"] = f"{ENGINE_DIR}/{TRT_CACHE_DIR}"
        start = time.perf_counter()
        # Creating the session proves the graph loads and optimises (and, for the TensorRT
        # provider, builds the engine into the cache).
        session = make_session(
            onnx_path, options.threads, _session_providers(key, details, build_dir, io, options)
        )
        details["providers"] = session.get_providers()
        details["input_type"] = session.get_inputs()[0].type
        record = EngineRecord.built(
            self.name,
            options,
            onnx_path,
            io,
            artifact=str(onnx_path.relative_to(build_dir)),
            build_seconds=round(time.perf_counter() - start, 3),
            size_bytes=_onnx_bytes(onnx_path),
            details=details,
            device=options.device,
        )
        write_engine_record(record, build_dir)
        return record

    def runner(self, record: EngineRecord, build_dir: Path, name: str | None = None):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        build_dir = Path(build_dir)
        path = build_dir / record.artifact
        threads = record.details.get("intra_op_threads")
        key = record.details.get("provider", "cpu")
        options = EngineOptions(
            precision=record.precision,
            max_batch=record.max_batch,
            opt_batch=record.profile.get("opt"),
            sparsity=record.details.get("sparsity"),
        )
        io = {"input_name": record.input_name, "input_shape": record.input_shape}
        providers = _session_providers(key, record.details, build_dir, io, options)
        return OnnxrtRunner(lambda: make_session(path, threads, providers), name=name or self.name)

    def recheck_command(self, record: EngineRecord, tolerances: dict[str, float]) -> str | None:
        provider = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "trt"}[
            record.details.get("provider", "cpu")
        ]
        return (
            f"polygraphy run {record.artifact} --onnxrt --providers {provider} "
            f"--load-inputs parity/inputs.json --load-outputs parity/reference.json "
            f"--atol {tolerances['atol']} --rtol {tolerances['rtol']}"
        )

    def triton(self, record: EngineRecord) -> TritonServing:
        key = record.details.get("provider", "cpu")
        accelerators: tuple[tuple[str, dict[str, str]], ...] = ()
        if key == "tensorrt":
            # Triton's onnxruntime backend turns its TensorRT provider on from this section.
            params = {"precision_mode": "FP16" if record.precision == "fp16" else "FP32"}
            accelerators = (("tensorrt", params),)
        return TritonServing(
            kind="onnxruntime_onnx",
            instance_kind="KIND_GPU" if key != "cpu" else "KIND_CPU",
            model_file="model.onnx",
            gpu_accelerators=accelerators,
            python_runner="onnxruntime" if key == "cpu" else None,
        )


def _session_providers(key, details, build_dir: Path, io, options: EngineOptions) -> list[Any]:
    cache = details.get("trt_cache_dir")
    return provider_list(
        key,
        precision=options.precision,
        sparsity=options.sparsity,
        cache_dir=(build_dir / cache) if cache else None,
        input_name=io["input_name"],
        input_shape=list(io["input_shape"]),
        profile=options.profile,
    )


def make_session(onnx_path: Path, threads: int | None = None, providers: list[Any] | None = None):
    """An InferenceSession on `providers` (CPU by default) that refuses a silent CPU fallback."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle ORT threads spin by default; interleaved sessions (dense vs pruned timing) would then
    # steal each other's cores and distort the comparison.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load {onnx_path}: {str(exc)[:200]}") from None
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if session.get_providers()[0] != wanted:
        raise MissingDependencyError(
            f"ONNX Runtime could not start {wanted} for {onnx_path.name} (it fell back to "
            f"{session.get_providers()[0]}); check CUDA/cuDNN/TensorRT libraries"
        )
    return session


def _onnx_bytes(onnx_path: Path) -> int:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)
