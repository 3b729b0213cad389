"""Inference backends as plug-ins: onnxruntime (CPU default; CUDA and TensorRT providers),
openvino (CPU, fp32/bf16), tensorrt (GPU). Each module registers its class with
`@register_backend`; heavy runtimes are imported only inside the functions that use them."""

from __future__ import annotations

from mpdeploy.backends import onnxruntime as _onnxruntime  # noqa: F401  (registers)
from mpdeploy.backends import openvino as _openvino  # noqa: F401  (registers)
from mpdeploy.backends import tensorrt as _tensorrt  # noqa: F401  (registers)
from mpdeploy.backends.base import (
    PRECISION_TOLERANCES,
    Backend,
    EngineOptions,
    EngineRecord,
    TritonServing,
    read_engine_record,
    register_backend,
    registered_backends,
    write_engine_record,
)
from mpdeploy.errors import MissingDependencyError, UserError

__all__ = [
    "BACKENDS",
    "PRECISION_TOLERANCES",
    "Backend",
    "EngineOptions",
    "EngineRecord",
    "TritonServing",
    "all_devices",
    "all_precisions",
    "backend_names",
    "get_backend",
    "read_engine_record",
    "register_backend",
    "write_engine_record",
]


def backend_names() -> tuple[str, ...]:
    return tuple(registered_backends())


def all_precisions() -> tuple[str, ...]:
    """Every precision some backend supports, in a stable order (CLI choices)."""
    seen: dict[str, None] = {}
    for cls in registered_backends().values():
        seen.update(dict.fromkeys(cls.precisions))
    return tuple(seen)


def all_devices() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for cls in registered_backends().values():
        seen.update(dict.fromkeys(cls.devices))
    return tuple(seen)


BACKENDS = backend_names()


def get_backend(name: str, *, require_available: bool = True) -> Backend:
    """The registered backend `name`; with `require_available`, refuse one that cannot run here
    at all (its default options) in one line."""
    cls = registered_backends().get(name)
    if cls is None:
        raise UserError(f"unknown backend '{name}': choose one of {', '.join(backend_names())}")
    backend = cls()
    reason = backend.unavailable_reason() if require_available else None
    if reason:
        raise MissingDependencyError(f"--backend {name} is not available here: {reason}")
    return backend
