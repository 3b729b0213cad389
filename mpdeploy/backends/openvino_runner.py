"""OpenVINO at run time: compiling an IR with exactly the precision asked for, and a Polygraphy
runner over it, so parity and the A/B benchmark run OpenVINO through the same protocol as ONNX
Runtime and TensorRT."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mpdeploy.errors import MissingDependencyError, UserError

# mpdeploy precision → OpenVINO's INFERENCE_PRECISION_HINT value (also in the Triton config)
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def compile_ir(xml: Path, precision: str, threads: int | None = None):
    """Compile an IR for the CPU with exactly `precision`; refuse if OpenVINO reports another."""
    import openvino as ov

    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip() and "Exception from" not in ln]
        detail = (lines[0] if lines else type(exc).__name__)[:200]
        raise UserError(f"OpenVINO cannot compile {xml.name}: {detail}") from None
    used = effective_precision(compiled)
    if used != precision:
        raise MissingDependencyError(
            f"OpenVINO compiled {xml.name} in {used}, not the {precision} that was asked for"
        )
    return compiled


def effective_precision(compiled) -> str:
    """The inference precision a compiled model reports, in mpdeploy's names (fp32, bf16, …)."""
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    for name, markers in (("bf16", ("bf16", "bfloat16")), ("fp16", ("f16", "float16"))):
        if any(m in hint for m in markers):
            return name
    return "fp32"


class OpenVinoRunner(BaseRunner):
    """A Polygraphy runner over an OpenVINO IR on the CPU, timed around one synchronous infer."""

    def __init__(self, xml: Path, precision: str, threads: int | None = None, name=None):
        super().__init__(name=name or "openvino", prefix="openvino-runner")
        self.xml = Path(xml)
        self.precision = precision
        self.threads = threads

    def activate_impl(self):
        self.compiled = compile_ir(self.xml, self.precision, self.threads)
        self.request = self.compiled.create_infer_request()
        self.output_names = [port.any_name for port in self.compiled.outputs]

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for port in self.compiled.inputs:
            shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
            meta.add(port.any_name, dtype=np.float32, shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feed_dict.items()}
        start = time.perf_counter()
        self.request.infer(feeds)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(
            (name, np.array(self.request.get_tensor(name).data, copy=True))
            for name in self.output_names
        )

    def deactivate_impl(self):
        del self.request
        del self.compiled
