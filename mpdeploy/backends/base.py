"""The one interface every inference backend implements, and the registry that lists them.

A backend owns everything that differs between runtimes: how an engine is built from the ONNX,
which Polygraphy runner runs it, the precisions and devices it supports, the parity tolerances
of each precision, how benchmark inputs reach it, and how Triton serves it. `verify/`, `serving/`
and the CLI ask the backend instead of branching on its name.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Literal

from mpdeploy.errors import UserError
from mpdeploy.fileio import read_json, write_json

Precision = Literal["fp32", "fp16", "bf16"]
ENGINE_DIR = "engine"
ENGINE_RECORD = "engine.json"

# Parity tolerances by precision. Elementwise: an output element fails only where BOTH its
# absolute and relative error exceed. Logits, compared with the fp32 PyTorch reference.
# fp32: ONNX Runtime matches torch to ~3e-6 on ViT-B/ResNet50/ConvNeXt; 1e-4 leaves room for
# reduction-order differences while still catching any real graph error.
# fp16: half precision has a unit roundoff of ~1e-3 that accumulates through depth; 5e-2 on logits
# with ≥ 99 % top-1 agreement is the usual bar for fp16 classifiers.
# bf16: 8 mantissa bits (unit roundoff 2^-9 ≈ 2e-3, 8× fp16's). Chosen from measured logit errors
# (scripts/bf16_errors.py → docs/bf16-errors.json, docs/benchmarks.md "bf16 parity"): the demo ViT
# on 256 digits and efficientnet-lite0 (ImageNet weights) on 48 real photo crops, bf16 by torch
# CPU autocast (OpenVINO's recipe) and all-bf16 (a pessimistic bound). atol = the largest |Δ|
# measured (0.58) rounded up to the next 1-2-5 step; rtol 0.1; top-1 floor = the lowest agreement
# measured (95.8 %) rounded down to a multiple of 5 %.
PRECISION_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "min_top1_agreement": 0.99},
    "fp16": {"atol": 5e-2, "rtol": 5e-2, "min_top1_agreement": 0.99},
    "bf16": {"atol": 1.0, "rtol": 1e-1, "min_top1_agreement": 0.95},
}


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    precision: Precision = "fp32"
    max_batch: int = 64
    opt_batch: int | None = None  # default: max_batch
    sparsity: str | None = None  # "2:4" asks TensorRT (or ORT's TensorRT provider) for sparse math
    threads: int | None = None
    device: str = "cpu"  # "cpu" | "cuda"
    provider: str | None = None  # ONNX Runtime on cuda: "cuda" (default) | "tensorrt"

    @property
    def profile(self) -> dict[str, int]:
        return {"min": 1, "opt": self.opt_batch or self.max_batch, "max": self.max_batch}


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    """What was built: `artifact` is the file (relative to the build dir) that gets shipped."""

    backend: str
    precision: Precision
    onnx: str
    artifact: str
    max_batch: int
    profile: dict[str, int]
    input_name: str
    output_name: str
    input_shape: list[int]
    num_classes: int
    build_seconds: float
    size_bytes: int
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "cpu"  # where the engine runs: "cpu" | "cuda"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def built(
        cls,
        backend: str,
        options: EngineOptions,
        onnx_path: Path,
        io: dict[str, Any],
        **fields: Any,
    ) -> EngineRecord:
        """A record whose build options and graph I/O come from `options` and `read_onnx_io`;
        `fields` are the backend's own (artifact, build_seconds, size_bytes, details, device)."""
        return cls(
            backend=backend,
            precision=options.precision,
            onnx=onnx_path.name,
            max_batch=options.max_batch,
            profile=options.profile,
            input_name=io["input_name"],
            output_name=io["output_name"],
            input_shape=list(io["input_shape"]),
            num_classes=io["num_classes"],
            **fields,
        )

    @classmethod
    def from_dict(cls, payload: dict[str, Any], *, partial: bool = False) -> EngineRecord:
        """The record in an engine.json; `partial` fills absent fields with None, for readers
        that need only some of them (publishing asks the backend how Triton serves it)."""
        fields = dataclasses.fields(cls)
        values = {f.name: payload[f.name] for f in fields if f.name in payload}
        if partial:
            for f in fields:
                if f.name not in values and f.default is dataclasses.MISSING:
                    values[f.name] = {} if f.default_factory is not dataclasses.MISSING else None
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class TritonServing:
    """How Triton serves one engine: the config's platform or backend, where instances run, the
    file(s) a version folder holds, and backend-specific config entries."""

    kind: str  # a Triton platform (onnxruntime_onnx, tensorrt_plan) or backend (openvino, python)
    instance_kind: str  # KIND_CPU | KIND_GPU
    model_file: str  # the name Triton loads from the version folder
    extra_files: tuple[str, ...] = ()  # build-relative files copied beside it (e.g. model.bin)
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    # optimization.execution_accelerators.gpu_execution_accelerator entries: (name, parameters)
    gpu_accelerators: tuple[tuple[str, dict[str, str]], ...] = ()
    # What the python-backend variant runs this artifact with (mpdeploy_runner), None: not offered
    python_runner: str | None = None


def write_engine_record(record: EngineRecord, build_dir: Path) -> Path:
    return write_json(Path(build_dir) / ENGINE_DIR / ENGINE_RECORD, record.to_dict())


def read_engine_record(build_dir: Path) -> EngineRecord:
    path = Path(build_dir) / ENGINE_DIR / ENGINE_RECORD
    if not path.is_file():
        raise UserError(f"{build_dir} has no engine (run the engine stage first)")
    return EngineRecord.from_dict(read_json(path))


def read_onnx_io(onnx_path: Path) -> dict[str, Any]:
    """Input/output names and shapes, and whether any weight is fp16 (without loading weights)."""
    import onnx

    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist (run the export stage first)")
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UserError(f"{onnx_path.name}: expected one input and one output")
    in_dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    out_dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    if any(d <= 0 for d in in_dims[1:]):
        raise UserError(f"{onnx_path.name}: only the batch dimension may be dynamic")
    fp16 = onnx.TensorProto.FLOAT16
    has_fp16 = any(t.data_type == fp16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16 for v in graph.value_info
    )
    return {
        "input_name": inputs[0].name,
        "output_name": graph.output[0].name,
        "input_shape": tuple(in_dims[1:]),
        "num_classes": int(out_dims[-1]) if out_dims else 0,
        "has_fp16": has_fp16,
    }


class Backend(abc.ABC):
    name: str
    summary: str = ""
    precisions: tuple[str, ...] = ("fp32",)
    devices: tuple[str, ...] = ("cpu",)

    def unavailable_reason(self, options: EngineOptions | None = None) -> str | None:
        """None when this backend can build and run `options` here, else one line saying what is
        missing (a package, a GPU, a CPU feature)."""
        return None

    def check(self, options: EngineOptions) -> None:
        """Refuse unsupported precisions/devices (UserError) and what this machine cannot run
        (MissingDependencyError), before any work is done."""
        from mpdeploy.errors import MissingDependencyError

        if options.precision not in self.precisions:
            raise UserError(
                f"--backend {self.name} supports --precision {' or '.join(self.precisions)} "
                f"(got {options.precision})"
            )
        if options.device not in self.devices:
            raise UserError(
                f"--backend {self.name} runs on --device {' or '.join(self.devices)} "
                f"(got {options.device})"
            )
        reason = self.unavailable_reason(options)
        if reason:
            raise MissingDependencyError(f"--backend {self.name} is not available here: {reason}")

    def source_onnx(self, options: EngineOptions) -> str:
        """The exported ONNX file (in the build directory) this backend builds from."""
        return "model.onnx"

    def parity_tolerances(self, precision: str) -> dict[str, float]:
        return dict(PRECISION_TOLERANCES[precision])

    def recheck_command(self, record: EngineRecord, tolerances: dict[str, float]) -> str | None:
        """A command that re-runs the parity comparison outside mpdeploy, if a tool can."""
        return None

    def bench_feed(self, record: EngineRecord, feed):
        """How benchmark inputs reach the runner: `feed(batch)` → feed dict (host numpy here)."""
        return feed

    def bench_infer_kwargs(self, record: EngineRecord) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def triton(self, record: EngineRecord) -> TritonServing:
        """How Triton serves `record`'s artifact."""

    @abc.abstractmethod
    def build(self, onnx_path: Path, build_dir: Path, options: EngineOptions) -> EngineRecord:
        """Build an engine from `onnx_path` into `build_dir/engine/` and describe it."""

    @abc.abstractmethod
    def runner(self, record: EngineRecord, build_dir: Path, name: str | None = None):
        """A Polygraphy runner (activate/infer/deactivate) over the built artifact."""


def cuda_feed(feed):
    """The same feed as torch CUDA tensors, so GPU runners time no host-to-device copy."""
    import torch

    def on_device(batch: int) -> dict[str, Any]:
        return {k: torch.from_numpy(v).cuda() for k, v in feed(batch).items()}

    return on_device


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend selectable by its `name` (CLI choices derive from this)."""
    _REGISTRY[cls.name] = cls
    return cls


def registered_backends() -> dict[str, type[Backend]]:
    return dict(_REGISTRY)
