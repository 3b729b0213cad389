"""Inference backends behind one interface: onnxruntime (CPU default), tensorrt (GPU, optional)."""

from __future__ import annotations

from mpdeploy.backends.base import (
    Backend,
    EngineOptions,
    EngineRecord,
    read_engine_record,
    write_engine_record,
)
from mpdeploy.errors import MissingDependencyError, UserError

BACKENDS = ("onnxruntime", "tensorrt")

__all__ = [
    "BACKENDS",
    "Backend",
    "EngineOptions",
    "EngineRecord",
    "get_backend",
    "read_engine_record",
    "write_engine_record",
]


def get_backend(name: str, *, require_available: bool = True) -> Backend:
    if name == "onnxruntime":
        from mpdeploy.backends.onnxruntime import OnnxRuntimeBackend

        backend: Backend = OnnxRuntimeBackend()
    elif name == "tensorrt":
        from mpdeploy.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend()
    else:
        raise UserError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
    reason = backend.unavailable_reason() if require_available else None
    if reason:
        raise MissingDependencyError(f"--backend {name} is not available here: {reason}")
    return backend
