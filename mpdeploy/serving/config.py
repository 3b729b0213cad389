"""Triton `config.pbtxt` as a typed protobuf: built, printed and parsed with Triton's own schema."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mpdeploy.errors import MissingDependencyError, UserError
from mpdeploy.serving.tensors import TensorSpec

ONNX_PLATFORM = "onnxruntime_onnx"
PLAN_PLATFORM = "tensorrt_plan"
PYTHON_BACKEND = "python"
OPENVINO_BACKEND = "openvino"
# Kinds a config names with `backend:` (no platform exists for them).
BACKEND_KINDS = (PYTHON_BACKEND, OPENVINO_BACKEND)

# What Triton loads from a version folder when `default_model_filename` is not set.
DEFAULT_MODEL_FILE = {
    ONNX_PLATFORM: "model.onnx",
    PLAN_PLATFORM: "model.plan",
    PYTHON_BACKEND: "model.py",
    "pytorch_libtorch": "model.pt",
    "tensorflow_graphdef": "model.graphdef",
    "tensorflow_savedmodel": "model.savedmodel",
    OPENVINO_BACKEND: "model.xml",
}
# A config may name the backend instead of the platform; both spellings mean the same thing.
_BACKEND_TO_KIND = {
    "onnxruntime": ONNX_PLATFORM,
    "tensorrt": PLAN_PLATFORM,
    "pytorch": "pytorch_libtorch",
}

QUEUE_DELAY_US = 100  # long enough to gather a batch under load, short against a ViT forward
WARMUP_NAME = "mpdeploy_zero_batch1"
PARAMETER_PREFIX = "mpdeploy_"


def model_config_pb2():
    """Triton's `model_config.proto` bindings, as shipped in tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except ImportError as exc:
        raise MissingDependencyError(
            "Triton model configs need tritonclient: pip install 'mpdeploy[serve]'"
        ) from exc
    return pb2


def build_config(
    name: str,
    kind: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int,
    instance_kind: str,
    instance_count: int,
    label_filename: str | None = None,
    parameters: Mapping[str, str] | None = None,
    output_data_type: str | None = None,
    gpu_accelerators: Sequence[tuple[str, Mapping[str, str]]] = (),
):
    """A `ModelConfig` for one mpdeploy artifact.

    `kind` is a platform (`onnxruntime_onnx`, `tensorrt_plan`) or a backend (`openvino`,
    `python`). `output_data_type` overrides the outputs' type (the python model casts its
    logits). `gpu_accelerators` fills `optimization.execution_accelerators` (e.g. ONNX Runtime's
    TensorRT provider: `("tensorrt", {"precision_mode": "FP16"})`).
    """
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name, max_batch_size=max_batch_size)
    if kind in BACKEND_KINDS:
        config.backend = kind
    else:
        config.platform = kind
    for accelerator, accelerator_parameters in gpu_accelerators:
        entry = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name=accelerator
        )
        for key, value in accelerator_parameters.items():
            entry.parameters[key] = value
    batched = max_batch_size > 0
    for spec in inputs:
        config.input.add(
            name=spec.name, data_type=_data_type(pb2, spec.data_type), dims=spec.dims(batched)
        )
    for spec in outputs:
        out = config.output.add(
            name=spec.name,
            data_type=_data_type(pb2, output_data_type or spec.data_type),
            dims=spec.dims(batched),
        )
        if label_filename:
            out.label_filename = label_filename
    config.version_policy.latest.num_versions = 1
    sizes = preferred_batch_sizes(max_batch_size)
    if sizes:
        config.dynamic_batching.preferred_batch_size.extend(sizes)
        config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    config.instance_group.add(
        kind=pb2.ModelInstanceGroup.Kind.Value(instance_kind), count=instance_count
    )
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    _add_warmup(pb2, config, inputs, batched)
    return config


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 2 up to the engine's max batch (none when the model cannot batch)."""
    sizes, size = [], 2
    while size <= max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes


def _add_warmup(pb2, config, inputs: Sequence[TensorSpec], batched: bool) -> None:
    # One zero-filled batch-1 request makes Triton run the model once at load time, so a broken
    # artifact fails the load instead of the first client request.
    if any(d < 0 for spec in inputs for d in spec.dims(batched)):
        return  # a dynamic non-batch dim has no single warm-up shape
    warmup = config.model_warmup.add(name=WARMUP_NAME, batch_size=1)
    for spec in inputs:
        warmup.inputs[spec.name].CopyFrom(
            pb2.ModelWarmup.Input(
                data_type=_data_type(pb2, spec.data_type), dims=spec.dims(batched), zero_data=True
            )
        )


def _data_type(pb2, name: str) -> int:
    return pb2.DataType.Value(name)


def data_type_name(config_value: int) -> str:
    return model_config_pb2().DataType.Name(config_value)


def config_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's schema; raises `text_format.ParseError`."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


def read_config(path: str | os.PathLike):
    """Parse a config.pbtxt; an unreadable or malformed one is a UserError naming the file."""
    from google.protobuf import text_format

    try:
        return parse_config(Path(path).read_text())
    except (text_format.ParseError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: not a valid Triton config ({_one_line(exc)})") from exc


def model_kind(config) -> str:
    """The platform or backend a config selects, with backend spellings mapped to platforms."""
    if config.platform:
        return config.platform
    return _BACKEND_TO_KIND.get(config.backend, config.backend)


def model_file_name(config) -> str | None:
    return config.default_model_filename or DEFAULT_MODEL_FILE.get(model_kind(config))


def tensor_signature(tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, data type, dims) of config inputs or outputs, for comparisons and messages."""
    return [(t.name, data_type_name(t.data_type), tuple(t.dims)) for t in tensors]


def mpdeploy_parameters(config) -> dict[str, str]:
    return {
        key: value.string_value
        for key, value in config.parameters.items()
        if key.startswith(PARAMETER_PREFIX)
    }


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__
