"""Export a PyTorch classifier to ONNX (dynamo exporter, legacy fallback), slim it, check it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Literal

import torch

from mpdeploy.errors import UserError
from mpdeploy.fileio import scratch_dir

log = logging.getLogger(__name__)

OPSET = 18  # TensorRT 10.x and 11.x parse it; ONNX Runtime ≥ 1.14 runs it
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf cannot hold more than 2 GB in one file
Exporter = Literal["auto", "dynamo", "legacy"]


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    path: str
    exporter: str
    opset: int
    nodes_before_slim: int
    nodes_after_slim: int
    external_data: bool
    size_bytes: int
    seconds: float
    fallback_reason: str | None = None


def export_onnx(
    model: torch.nn.Module,
    out_path: str | Path,
    input_shape: tuple[int, int, int],
    *,
    exporter: Exporter = "auto",
    slim: bool = True,
) -> ExportRecord:
    """Write `out_path` (and `<out_path>.data` for big models) atomically; return what was done."""
    out_path = Path(out_path)
    model = model.eval()
    example = torch.randn(2, *input_shape)  # batch ≥ 2: the dynamo exporter specialises 0/1
    start = time.perf_counter()
    with scratch_dir(out_path.parent, ".export-") as tmp:  # pid-named: stale once we are gone
        raw = tmp / "raw.onnx"
        used, fallback_reason = _export(model, example, raw, exporter)
        proto = _load(raw)
        nodes_before = len(proto.graph.node)
        if slim:
            proto = _slim(proto)
    external = save_checked(proto, out_path, what="exported ONNX")
    size = out_path.stat().st_size + (
        out_path.with_name(out_path.name + ".data").stat().st_size if external else 0
    )
    return ExportRecord(
        path=str(out_path),
        exporter=used,
        opset=OPSET,
        nodes_before_slim=nodes_before,
        nodes_after_slim=len(proto.graph.node),
        external_data=external,
        size_bytes=size,
        seconds=round(time.perf_counter() - start, 3),
        fallback_reason=fallback_reason,
    )


def _export(model, example, path: Path, exporter: Exporter) -> tuple[str, str | None]:
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example, path)
            return "dynamo", None
        except Exception as exc:
            if exporter == "dynamo":
                raise UserError(f"dynamo ONNX export failed: {_first_line(exc)}") from None
            reason = _first_line(exc)
            log.warning("dynamo exporter failed (%s); falling back to the legacy exporter", reason)
    else:
        reason = None
    try:
        _export_legacy(model, example, path)
    except Exception as exc:
        raise UserError(f"ONNX export failed with both exporters: {_first_line(exc)}") from None
    return "legacy", reason


def _export_dynamo(model, example, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=True,
            verbose=False,
        )
        program.save(str(path), external_data=True)


def _export_legacy(model, example, path: Path) -> None:
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


@contextlib.contextmanager
def _quiet():
    # The exporters print progress lines and deprecation warnings that are noise to our users.
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _slim(proto):
    import onnxslim

    with _quiet():
        slimmed = onnxslim.slim(proto)
    return slimmed if slimmed is not None else proto


def save_checked(proto, out_path: Path, *, what: str = "ONNX") -> bool:
    """Save `proto` (external data above 1.8 GB), pass onnx.checker, then move into place.

    Returns whether external data was written. Nothing appears at `out_path` unless it checked.
    """
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    external = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD
    with scratch_dir(out_path.parent, ".onnx-") as tmp:
        staged = tmp / out_path.name
        if external:
            onnx.save_model(
                proto,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=staged.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(proto, str(staged))
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise UserError(f"{what} failed onnx.checker: {_first_line(exc)}") from None
        _move_into_place(staged, out_path, external)
    return external


def _move_into_place(staged: Path, out_path: Path, external: bool) -> None:
    # The .data file goes first so a reader never sees a model.onnx whose weights are missing.
    data = staged.with_name(staged.name + ".data")
    target_data = out_path.with_name(out_path.name + ".data")
    if external:
        shutil.move(str(data), str(target_data))
    elif target_data.exists():
        target_data.unlink()
    shutil.move(str(staged), str(out_path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
