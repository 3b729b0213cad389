"""The inputs and outputs a served artifact really has, read from the ONNX file itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from mpdeploy.errors import UserError

# ONNX TensorProto element types → Triton data types (model_config.proto `DataType` names).
_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, Triton data type and full shape (-1 = dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]

    def dims(self, batched: bool) -> tuple[int, ...]:
        """The `dims` Triton expects: without the batch dim when the model is batched."""
        return self.shape[1:] if batched else self.shape

    def to_json(self) -> dict:
        return {"name": self.name, "data_type": self.data_type, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, record: dict) -> TensorSpec:
        return cls(record["name"], record["data_type"], tuple(int(d) for d in record["shape"]))


@dataclass(frozen=True)
class OnnxSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...]  # files the graph's weights live in, relative to the ONNX file


def read_onnx_signature(path: str | os.PathLike) -> OnnxSignature:
    """I/O names, types and shapes, read without loading the weights (external data stays put)."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, … for an unreadable file
        raise UserError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(_spec(v, path) for v in graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path) for v in graph.output)
    return OnnxSignature(inputs, outputs, _external_data_files(model, path))


def _spec(value_info, path) -> TensorSpec:
    tensor_type = value_info.type.tensor_type
    data_type = _ONNX_TO_TRITON.get(tensor_type.elem_type)
    if data_type is None:
        raise UserError(
            f"{path}: tensor {value_info.name!r} has ONNX element type {tensor_type.elem_type}, "
            "which Triton cannot serve"
        )
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return TensorSpec(value_info.name, data_type, shape)


def _external_data_files(model, path) -> tuple[str, ...]:
    import onnx

    locations: list[str] = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        relative = PurePosixPath(location or "")
        if not location or relative.is_absolute() or ".." in relative.parts:
            raise UserError(f"{path}: external data location {location!r} is not a local file")
        if location not in locations:
            locations.append(location)
    return tuple(locations)
