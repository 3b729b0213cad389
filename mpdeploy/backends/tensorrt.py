"""TensorRT backend (GPU, optional): a Polygraphy-built plan with a batch profile, a timing cache,
optional 2:4 sparse weights, and the build log's own evidence of which layers ran sparse.

TensorRT is imported only inside functions: without it (or without a GPU) the backend reports one
line through `unavailable_reason()` and nothing else in mpdeploy notices.

Precision (see docs/tensorrt.md): TensorRT 11 has no FP16/BF16/INT8 builder flags — every network
is strongly typed and takes its precision from the ONNX tensor types. TensorRT 10 supports strongly
typed networks too, so mpdeploy builds the same way on both: `--precision fp16` parses
`model.fp16.onnx` (norms and softmax kept fp32 by `mpdeploy.export.fp16`) as a strongly typed
network. Only a TensorRT without strong typing falls back to the weakly typed FP16 builder flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpdeploy import hardware
from mpdeploy.backends.base import (
    ENGINE_DIR,
    Backend,
    EngineOptions,
    EngineRecord,
    TritonServing,
    cuda_feed,
    register_backend,
    write_engine_record,
)
from mpdeploy.backends.base import read_onnx_io as _onnx_io
from mpdeploy.errors import MissingDependencyError, UserError
from mpdeploy.fileio import atomic_path, write_text

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mpdeploy[tensorrt]' on a machine with an NVIDIA GPU"
PLAN = "model.plan"
TIMING_CACHE = "timing.cache"
BUILD_LOG = "build.log"
LAYER_INFO = "layers.json"

# TensorRT prints these two INFO lines at the end of a build with sparse weights enabled
# (TensorRT developer guide, "Structured Sparsity"; trtexec --verbose and Polygraphy show them).
ELIGIBLE_MARKER = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARKER = "(Sparsity) TRT inference plan picked sparse implementation for layers:"


# --- availability -----------------------------------------------------------------------------


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT imports and a CUDA GPU is visible, else one line naming what is missing."""
    try:
        version = tensorrt_version()
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            return f"TensorRT is not installed ({INSTALL_HINT})"
        return f"TensorRT could not be imported: {_first_line(exc)} ({INSTALL_HINT})"
    except (ImportError, OSError) as exc:
        # The bindings wheel without the libs wheel (NVIDIA's index only) fails here with e.g.
        # "libnvonnxparser.so.11: cannot open shared object file: No such file or directory".
        return f"TensorRT's libraries could not be loaded: {_first_line(exc)} ({INSTALL_HINT})"
    if int(version.split(".")[0]) < 10:
        return f"TensorRT {version} is too old: mpdeploy needs TensorRT 10 or newer"
    if not hardware.gpu_devices():
        return f"TensorRT {version} is installed but no CUDA GPU is visible"
    return None


def tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


# --- pure decisions (tested without TensorRT) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrecisionStrategy:
    """How a precision request maps onto one TensorRT version."""

    onnx: str  # the ONNX the engine should be parsed from
    strongly_typed: bool  # the network takes its types from the ONNX
    request_strongly_typed_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED
    fp16_flag: bool  # set BuilderFlag.FP16 (weakly typed networks only)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_precision_strategy(
    trt_version: str,
    has_fp16_flag: bool,
    *,
    precision: str = "fp16",
    has_strongly_typed_flag: bool = True,
) -> PrecisionStrategy:
    """Pick the ONNX and the network typing for `precision` on TensorRT `trt_version`.

    Strong typing wherever TensorRT offers it (always on 11.x, by creation flag on 10.x): the engine
    then computes in exactly the types of the ONNX, so the fp32 islands of `model.fp16.onnx`
    survive and the parity check of that graph carries over. A weakly typed build with the FP16
    flag lets TensorRT run LayerNorm/Softmax in fp16 (the ViT overflow of TensorRT #2709) and is
    used only where strong typing does not exist.
    """
    if precision not in ("fp32", "fp16"):
        raise UserError(f"TensorRT precision must be fp32 or fp16 (got {precision})")
    major = _major(trt_version)
    onnx = "model.fp16.onnx" if precision == "fp16" else "model.onnx"
    if major >= 11 or not has_fp16_flag:
        # 11.x: no precision flags at all; networks are strongly typed whether or not the
        # (deprecated) creation flag is still exported, so pass it only where it exists.
        return PrecisionStrategy(
            onnx=onnx,
            strongly_typed=True,
            request_strongly_typed_flag=has_strongly_typed_flag,
            fp16_flag=False,
            reason=f"TensorRT {trt_version} has no FP16 builder flag: strongly typed network, "
            f"precision from {onnx}",
        )
    if has_strongly_typed_flag:
        return PrecisionStrategy(
            onnx=onnx,
            strongly_typed=True,
            request_strongly_typed_flag=True,
            fp16_flag=False,
            reason=f"TensorRT {trt_version}: strongly typed network from {onnx}, the same "
            "build as on TensorRT 11 (norms stay fp32 as the ONNX says)",
        )
    return PrecisionStrategy(
        onnx=onnx,
        strongly_typed=False,
        request_strongly_typed_flag=False,
        fp16_flag=precision == "fp16",
        reason=f"TensorRT {trt_version} has no strongly typed networks: weakly typed build"
        + (" with the FP16 builder flag" if precision == "fp16" else ""),
    )


def profile_shapes(
    input_shape: tuple[int, ...] | list[int], options: EngineOptions
) -> dict[str, tuple[int, ...]]:
    """min/opt/max input shapes of the single optimisation profile: batch 1 … max_batch."""
    profile = options.profile
    if not 1 <= profile["opt"] <= profile["max"]:
        raise UserError(
            f"batch profile needs 1 ≤ opt ≤ max (got opt {profile['opt']}, max {profile['max']})"
        )
    dims = tuple(int(d) for d in input_shape)
    return {key: (int(profile[key]), *dims) for key in ("min", "opt", "max")}


def parse_sparsity_log(text: str) -> dict[str, list[str]]:
    """Layer names from TensorRT's two "(Sparsity)" build-log lines: eligible and picked.

    Works on trtexec (`[I] [TRT] (Sparsity) …`) and Polygraphy (`[V] (Sparsity) …`) output;
    fused layers keep their " + " names; an empty list after the colon means none.
    """
    found: dict[str, list[str]] = {"eligible": [], "picked": []}
    for line in text.splitlines():
        for key, marker in (("eligible", ELIGIBLE_MARKER), ("picked", PICKED_MARKER)):
            at = line.find(marker)
            if at < 0:
                continue
            for name in line[at + len(marker) :].split(","):
                name = name.strip()
                if name and name not in found[key]:
                    found[key].append(name)
    return found


def sparse_tactic_layers(engine_information: dict[str, Any]) -> list[str]:
    """Layers whose tactic name mentions "sparse" in the engine inspector's JSON (a heuristic:
    TensorRT does not document tactic names; the build log above is the authoritative list)."""
    names = []
    for layer in engine_information.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        tactic = " ".join(str(v) for k, v in layer.items() if "tactic" in k.lower())
        if re.search(r"sparse", tactic, re.IGNORECASE):
            names.append(str(layer.get("Name", "?")))
    return names


# --- build log capture ------------------------------------------------------------------------


@contextlib.contextmanager
def capture_polygraphy_log() -> Iterator[list[str]]:
    """Collect every message Polygraphy's logger (and TensorRT's, which Polygraphy forwards to it)
    emits inside the block, down to TensorRT VERBOSE, instead of printing it."""
    from polygraphy.logger import G_LOGGER

    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    old_severity = G_LOGGER.module_severity
    old_python = G_LOGGER.use_python_logging_system
    G_LOGGER.use_python_logging_system = True
    python_logger = G_LOGGER.python_logger
    old_level, old_propagate = python_logger.level, python_logger.propagate
    handler = _Collect(level=1)
    python_logger.addHandler(handler)
    python_logger.setLevel(1)
    python_logger.propagate = False
    G_LOGGER.module_severity = G_LOGGER.EXTRA_VERBOSE  # TensorRT VERBOSE lands here
    try:
        yield lines
    finally:
        G_LOGGER.module_severity = old_severity
        python_logger.removeHandler(handler)
        python_logger.setLevel(old_level)
        python_logger.propagate = old_propagate
        G_LOGGER.use_python_logging_system = old_python


# --- the backend ------------------------------------------------------------------------------


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = "TensorRT plan on an NVIDIA GPU (optional 2:4 sparse weights)"
    precisions = ("fp32", "fp16")
    devices = ("cuda",)

    def unavailable_reason(self, options: EngineOptions | None = None) -> str | None:
        return tensorrt_unavailable_reason()

    def check(self, options: EngineOptions) -> None:
        # TensorRT always runs on the GPU: --device is implied, not asked for.
        super().check(dataclasses.replace(options, device="cuda"))

    def source_onnx(self, options: EngineOptions) -> str:
        return "model.fp16.onnx" if options.precision == "fp16" else "model.onnx"

    def bench_feed(self, record: EngineRecord, feed):
        # CUDA tensors in, outputs left on the device: the timing is the engine, not PCIe.
        if not hardware.torch_cuda():
            return feed
        return cuda_feed(feed)

    def bench_infer_kwargs(self, record: EngineRecord) -> dict[str, Any]:
        return {"copy_outputs_to_host": False} if hardware.torch_cuda() else {}

    def triton(self, record: EngineRecord) -> TritonServing:
        # What the plan is locked to, so a mismatch shows before the server fails to load it.
        details = record.details or {}
        if not details.get("tensorrt_version"):
            raise UserError(
                "engine/engine.json: a TensorRT plan without its TensorRT version "
                "(details.tensorrt_version) cannot be locked to it; rebuild it with "
                "`mpdeploy engine`"
            )
        locked = {
            "mpdeploy_tensorrt_version": details.get("tensorrt_version"),
            "mpdeploy_gpu_name": details.get("gpu"),
            "mpdeploy_compute_capability": details.get("compute_capability"),
        }
        return TritonServing(
            kind="tensorrt_plan",
            instance_kind="KIND_GPU",
            model_file="model.plan",
            parameters={k: str(v) for k, v in locked.items() if v is not None},
        )

    def build(self, onnx_path: Path, build_dir: Path, options: EngineOptions) -> EngineRecord:
        reason = self.unavailable_reason()
        if reason:
            raise MissingDependencyError(f"--backend tensorrt is not available here: {reason}")
        import tensorrt as trt

        build_dir, onnx_path = Path(build_dir), Path(onnx_path)
        engine_dir = build_dir / ENGINE_DIR
        engine_dir.mkdir(parents=True, exist_ok=True)
        io = _onnx_io(onnx_path)
        strategy = choose_precision_strategy(
            trt.__version__,
            hasattr(trt.BuilderFlag, "FP16"),
            precision=options.precision,
            has_strongly_typed_flag=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
        )
        if strategy.strongly_typed and options.precision == "fp16" and not io["has_fp16"]:
            raise UserError(
                f"{onnx_path.name} has no fp16 tensors: a strongly typed TensorRT build takes its "
                "precision from the ONNX, so build --precision fp16 from model.fp16.onnx"
            )
        if options.sparsity == "2:4" and options.precision != "fp16":
            # TensorRT has sparse tactics for fp16/int8 math only; the fp32 engine stays dense.
            log.warning(
                "--sparsity 2:4 with --precision fp32: TensorRT will pick no sparse "
                "kernels (they exist for fp16/int8); build with --precision fp16"
            )
        shapes = profile_shapes(io["input_shape"], options)
        start = time.perf_counter()
        engine, log_lines = _build_plan(
            onnx_path,
            engine_dir,
            io["input_name"],
            shapes,
            strategy,
            sparse=options.sparsity == "2:4",
        )
        build_seconds = time.perf_counter() - start
        build_log = "\n".join(log_lines) + "\n"
        write_text(engine_dir / BUILD_LOG, build_log)
        sparsity = parse_sparsity_log(build_log)
        inspector = _engine_information(engine, trt)
        from mpdeploy.fileio import write_json

        write_json(engine_dir / LAYER_INFO, inspector)
        gpu = (hardware.gpu_devices() or ({},))[0]
        plan = engine_dir / PLAN
        details: dict[str, Any] = {
            "tensorrt_version": trt.__version__,
            "gpu": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability"),
            "precision_strategy": strategy.to_dict(),
            "sparse_weights": options.sparsity == "2:4",
            "profile_shapes": {k: list(v) for k, v in shapes.items()},
            "timing_cache": f"{ENGINE_DIR}/{TIMING_CACHE}",
            "build_log": f"{ENGINE_DIR}/{BUILD_LOG}",
            "layer_information": f"{ENGINE_DIR}/{LAYER_INFO}",
            "sparse_layers_eligible": sparsity["eligible"],
            "sparse_layers_picked": sparsity["picked"],
            "inspector_sparse_tactic_layers": sparse_tactic_layers(inspector),
            "engine_layers": len(inspector.get("Layers", [])),
        }
        details["headline"] = {
            "trt_version": trt.__version__,
            "trt_gpu": gpu.get("name"),
            "trt_strongly_typed": strategy.strongly_typed,
            "sparse_layers_eligible": len(sparsity["eligible"]),
            "sparse_layers_picked": len(sparsity["picked"]),
        }
        record = EngineRecord.built(
            self.name,
            options,
            onnx_path,
            io,
            artifact=f"{ENGINE_DIR}/{PLAN}",
            build_seconds=round(build_seconds, 3),
            size_bytes=plan.stat().st_size,
            details=details,
            device="cuda",
        )
        write_engine_record(record, build_dir)
        return record

    def runner(self, record: EngineRecord, build_dir: Path, name: str | None = None):
        """A TrtRunner over the exact plan file that is shipped (deserialised from its bytes)."""
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        plan = Path(build_dir) / record.artifact
        if not plan.is_file():
            raise UserError(f"{plan} is missing (run the engine stage first)")
        return TrtRunner(EngineFromBytes(plan.read_bytes()), name=name or "tensorrt")


def _build_plan(onnx_path, engine_dir, input_name, shapes, strategy, *, sparse: bool):
    """Parse, configure, build and save; returns the deserialised engine and the build log."""
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )
    from polygraphy.exception import PolygraphyException

    cache = engine_dir / TIMING_CACHE
    network = NetworkFromOnnxPath(
        str(onnx_path), strongly_typed=strategy.request_strongly_typed_flag or None
    )
    config = CreateConfig(
        fp16=strategy.fp16_flag or None,
        sparse_weights=sparse,
        profiles=[Profile().add(input_name, **shapes)],
        load_timing_cache=str(cache) if cache.is_file() else None,
    )
    with capture_polygraphy_log() as lines, atomic_path(engine_dir / PLAN) as staged:
        try:
            engine = SaveEngine(
                EngineFromNetwork(network, config=config, save_timing_cache=str(cache)),
                path=str(staged),
            )()
        except PolygraphyException as exc:
            errors = [line for line in lines if line.startswith(("[E]", "[!]"))]
            detail = (errors[-1] if errors else _first_line(exc))[:240]
            raise UserError(f"TensorRT could not build {onnx_path.name}: {detail}") from None
    return engine, lines


def _engine_information(engine, trt) -> dict[str, Any]:
    try:
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        return json.loads(text)
    except Exception as exc:  # the inspector is evidence, not a requirement of the build
        log.warning("TensorRT engine inspector unavailable: %s", _first_line(exc))
        return {"error": _first_line(exc)}


def _major(version: str) -> int:
    match = re.match(r"\s*(\d+)", str(version))
    if not match:
        raise UserError(f"cannot read a TensorRT version from '{version}'")
    return int(match.group(1))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
