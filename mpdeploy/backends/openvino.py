"""OpenVINO backend (CPU, optional extra `openvino`): the exported `model.onnx` converted to
OpenVINO IR (`engine/model.xml` + `model.bin`), compiled with an explicit inference precision.

OpenVINO's CPU plugin silently picks bf16 on CPUs with native bf16 and silently stays f32 on
the others, so mpdeploy never leaves the choice to it: `--precision fp32` compiles with
`INFERENCE_PRECISION_HINT: f32`, `--precision bf16` with `bf16`, and bf16 is refused in one line
on a CPU without AVX512_BF16 or AMX (OpenVINO would run f32 and the bf16 label would be false).
After compiling, the precision OpenVINO reports it uses is checked against the one asked for.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mpdeploy import hardware
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
from mpdeploy.errors import UserError

INSTALL_HINT = "pip install 'mpdeploy[openvino]'"
IR_XML = "model.xml"
IR_BIN = "model.bin"


def openvino_version() -> str:
    import openvino as ov

    return str(ov.__version__).split("-")[0]


def openvino_unavailable_reason(precision: str = "fp32") -> str | None:
    """None when OpenVINO imports and can run `precision` on this CPU, else one line."""
    try:
        version = openvino_version()
    except ImportError as exc:
        if getattr(exc, "name", None) == "openvino":
            return f"OpenVINO is not installed ({INSTALL_HINT})"
        return f"OpenVINO could not be imported: {str(exc).splitlines()[0][:200]}"
    if precision == "bf16":
        cpu = hardware.cpu_info()
        if not cpu.native_bf16 or "BF16" not in cpu_capabilities():
            return (
                f"bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); this {cpu.model} has "
                f"neither, so OpenVINO {version} would silently run f32 (use --precision fp32)"
            )
    return None


def cpu_capabilities() -> list[str]:
    """OpenVINO's own list of what its CPU plugin can do here (FP32, BF16, INT8, …)."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    summary = "OpenVINO on the CPU, fp32 or bf16 (CPUs with AVX512_BF16/AMX)"
    precisions = ("fp32", "bf16")
    devices = ("cpu",)

    def unavailable_reason(self, options: EngineOptions | None = None) -> str | None:
        return openvino_unavailable_reason(options.precision if options else "fp32")

    def build(self, onnx_path: Path, build_dir: Path, options: EngineOptions) -> EngineRecord:
        self.check(options)
        import openvino as ov

        build_dir, onnx_path = Path(build_dir), Path(onnx_path)
        io = read_onnx_io(onnx_path)
        engine_dir = build_dir / ENGINE_DIR
        engine_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            model = ov.Core().read_model(str(onnx_path))
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot read {onnx_path.name}: {_first_line(exc)}") from None
        xml = engine_dir / IR_XML
        # Weights stay fp32 in the IR: precision is a compile-time choice, so one IR serves both.
        with tempfile.TemporaryDirectory(dir=engine_dir, prefix=".openvino-ir-") as tmp:
            scratch = Path(tmp)
            ov.save_model(model, str(scratch / IR_XML), compress_to_fp16=False)
            (scratch / IR_BIN).replace(engine_dir / IR_BIN)
            (scratch / IR_XML).replace(xml)
        from mpdeploy.backends.openvino_runner import compile_ir

        compiled = compile_ir(xml, options.precision, options.threads)  # proves it compiles
        record = EngineRecord.built(
            self.name,
            options,
            onnx_path,
            io,
            artifact=f"{ENGINE_DIR}/{IR_XML}",
            build_seconds=round(time.perf_counter() - start, 3),
            size_bytes=xml.stat().st_size + (engine_dir / IR_BIN).stat().st_size,
            details={
                "openvino_version": openvino_version(),
                "ir_weights": f"{ENGINE_DIR}/{IR_BIN}",
                "inference_precision_hint": _type_name(
                    compiled.get_property("INFERENCE_PRECISION_HINT")
                ),
                "intra_op_threads": options.threads,
                "cpu": hardware.cpu_info().model,
                "cpu_native_bf16": hardware.cpu_info().native_bf16,
                "headline": {"openvino_precision": options.precision},
            },
        )
        write_engine_record(record, build_dir)
        return record

    def runner(self, record: EngineRecord, build_dir: Path, name: str | None = None):
        xml = Path(build_dir) / record.artifact
        if not xml.is_file():
            raise UserError(f"{xml} is missing (run the engine stage first)")
        from mpdeploy.backends.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(
            xml, record.precision, record.details.get("intra_op_threads"), name=name
        )

    def recheck_command(self, record: EngineRecord, tolerances: dict[str, float]) -> str | None:
        # Polygraphy's command line has no OpenVINO runner; mpdeploy's runner is the same code.
        return "mpdeploy verify --build . --force"

    def triton(self, record: EngineRecord) -> TritonServing:
        # Triton's openvino backend reads INFERENCE_NUM_THREADS (and only HINT_BF16=YES for
        # precision); INFERENCE_PRECISION_HINT is what mpdeploy's python-backend variant compiles
        # with, so both serve the precision that parity verified (docs/serving.md).
        from mpdeploy.backends.openvino_runner import OV_PRECISION

        parameters = {"INFERENCE_PRECISION_HINT": OV_PRECISION[record.precision]}
        if record.details.get("intra_op_threads"):
            parameters["INFERENCE_NUM_THREADS"] = str(record.details["intra_op_threads"])
        return TritonServing(
            kind="openvino",
            instance_kind="KIND_CPU",
            model_file=IR_XML,
            extra_files=(record.details.get("ir_weights", f"{ENGINE_DIR}/{IR_BIN}"),),
            parameters=parameters,
            python_runner="openvino",
        )


def _first_line(exc: BaseException) -> str:
    lines = [
        line for line in str(exc).splitlines() if line.strip() and "Exception from" not in line
    ]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _type_name(value) -> str:
    """OpenVINO's short name of an element type ("bf16", "f32"); str() gives "<Type: 'bfloat16'>"."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)
