"""The one small interface every inference backend implements (build once, run through Polygraphy)."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Literal

from mpdeploy.fileio import read_json, write_json

Precision = Literal["fp32", "fp16"]
ENGINE_DIR = "engine"
ENGINE_RECORD = "engine.json"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    precision: Precision = "fp32"
    max_batch: int = 64
    opt_batch: int | None = None  # default: max_batch
    sparsity: str | None = None  # "2:4" asks TensorRT for sparse weights
    threads: int | None = None

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_engine_record(record: EngineRecord, build_dir: Path) -> Path:
    return write_json(Path(build_dir) / ENGINE_DIR / ENGINE_RECORD, record.to_dict())


def read_engine_record(build_dir: Path) -> EngineRecord:
    from mpdeploy.errors import UserError

    path = Path(build_dir) / ENGINE_DIR / ENGINE_RECORD
    if not path.is_file():
        raise UserError(f"{build_dir} has no engine (run the engine stage first)")
    return EngineRecord(**read_json(path))


class Backend(abc.ABC):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when this backend can build and run here, else one line saying what is missing."""
        return None

    @abc.abstractmethod
    def build(self, onnx_path: Path, build_dir: Path, options: EngineOptions) -> EngineRecord:
        """Build an engine from `onnx_path` into `build_dir/engine/` and describe it."""

    @abc.abstractmethod
    def runner(self, record: EngineRecord, build_dir: Path, name: str | None = None):
        """A Polygraphy runner (activate/infer/deactivate) over the built artifact."""
