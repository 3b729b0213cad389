"""ONNX Runtime backend: the CPU default; the engine is the checked ONNX file itself."""

from __future__ import annotations

import time
from pathlib import Path

from mpdeploy.backends.base import Backend, EngineOptions, EngineRecord, write_engine_record
from mpdeploy.errors import UserError


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def build(self, onnx_path: Path, build_dir: Path, options: EngineOptions) -> EngineRecord:
        import onnxruntime as ort

        build_dir = Path(build_dir)
        onnx_path = Path(onnx_path)
        start = time.perf_counter()
        session = make_session(onnx_path, options.threads)  # proves the graph loads and optimises
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{onnx_path.name}: expected one input and one output")
        data = onnx_path.with_name(onnx_path.name + ".data")
        record = EngineRecord(
            backend=self.name,
            precision=options.precision,
            onnx=onnx_path.name,
            artifact=str(onnx_path.relative_to(build_dir)),
            max_batch=options.max_batch,
            profile=options.profile,
            input_name=inputs[0].name,
            output_name=outputs[0].name,
            input_shape=[int(d) for d in inputs[0].shape[1:]],
            num_classes=int(outputs[0].shape[1]),
            build_seconds=round(time.perf_counter() - start, 3),
            size_bytes=onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0),
            details={
                "onnxruntime_version": ort.__version__,
                "providers": session.get_providers(),
                "intra_op_threads": options.threads,
                "input_type": inputs[0].type,
            },
        )
        write_engine_record(record, build_dir)
        return record

    def runner(self, record: EngineRecord, build_dir: Path, name: str | None = None):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        path = Path(build_dir) / record.artifact
        threads = record.details.get("intra_op_threads")
        return OnnxrtRunner(lambda: make_session(path, threads), name=name or "onnxruntime")


def make_session(onnx_path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle ORT threads spin by default; interleaved sessions (dense vs pruned timing) would then
    # steal each other's cores and distort the comparison.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load {onnx_path}: {str(exc)[:200]}") from None
