"""manifest.json: per-stage records (status, duration, hashes, headline figures) and the environment."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from mpdeploy import __version__
from mpdeploy.errors import UserError, one_line
from mpdeploy.fileio import read_json, sha256_file, write_json

MANIFEST = "manifest.json"
_PACKAGES = (
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "onnxscript",
    "onnxslim",
    "polygraphy",
    "numpy",
    "tensorrt",
    "tritonclient",
    "nvidia-pytriton",
)


_STAGE_COMMAND = {"sparsify": "prune", "recover": "prune", "calibrate": "build", "analyze": "build"}
_AFTER_ARTIFACT = {"bench", "package"}


def _shape_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return f"expected a JSON object, found {type(payload).__name__}"
    for key in ("options", "model", "stages", "headline"):
        if not isinstance(payload.get(key), dict):
            return f"{key!r} is missing or not an object"
    return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment() -> dict[str, Any]:
    """Versions and hardware of this machine; absent packages are recorded as null."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from mpdeploy import hardware

    machine = hardware.summary()
    first = machine["gpus"][0] if machine["gpus"] else None
    gpu = (
        {
            "name": first["name"],
            "compute_capability": first["compute_capability"],
            "cuda": machine["torch_cuda_build"],
        }
        if first
        else None
    )
    return {
        "mpdeploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "gpu": gpu,
        "cpu": machine["cpu"],
    }


class Manifest:
    """The build's ledger; every change is written through atomically."""

    def __init__(self, build_dir: Path, payload: dict[str, Any]):
        self.build_dir = Path(build_dir)
        self.payload = payload

    @classmethod
    def create(cls, build_dir: Path, options: dict[str, Any]) -> Manifest:
        payload = {
            "mpdeploy_version": __version__,
            "created": now(),
            "options": options,
            "model": {},
            "environment": environment(),
            "stages": {},
            "headline": {},
        }
        manifest = cls(build_dir, payload)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, build_dir: Path) -> Manifest:
        path = Path(build_dir) / MANIFEST
        if not path.is_file():
            raise UserError(f"{build_dir} is not an mpdeploy build directory (no {MANIFEST})")
        try:
            payload = read_json(path)
        except (ValueError, OSError) as exc:
            raise UserError(f"{path} is corrupt: not readable JSON ({one_line(exc)})") from None
        problem = _shape_problem(payload)
        if problem:
            raise UserError(f"{path} is corrupt: {problem}")
        return cls(build_dir, payload)

    def require_complete(self) -> None:
        """Refuse (UserError) a build any of whose recorded stages failed or went stale.

        A stage rerun after a later one (an `mpdeploy prune --force` without export, engine and
        verify after it) would publish artifacts that do not come from the recorded options.
        """
        stages = self.payload.get("stages") or {}
        for name, record in stages.items():
            status = str((record or {}).get("status", ""))
            if status != "done" and not status.startswith("skipped"):
                command = _STAGE_COMMAND.get(name, name)
                raise UserError(
                    f"{self.build_dir}: stage {name} is {status or 'unfinished'}; rerun it with "
                    f"`mpdeploy {command} --build {self.build_dir} --force` before publishing"
                )
        # Records keep the order the stages first ran in (the pipeline's order); bench and
        # package do not change what is served, so rerunning them later is fine.
        ordered = [
            (n, (r or {}).get("finished", ""))
            for n, r in stages.items()
            if n not in _AFTER_ARTIFACT
        ]
        for (earlier, t_earlier), (later, t_later) in zip(ordered, ordered[1:], strict=False):
            if t_earlier and t_later and t_earlier > t_later:
                raise UserError(
                    f"{self.build_dir}: stage {earlier} was redone after {later}; rerun the stages "
                    f"after {earlier} (--force) before publishing"
                )

    @property
    def options(self) -> dict[str, Any]:
        return self.payload["options"]

    @property
    def model(self) -> dict[str, Any]:
        return self.payload["model"]

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.payload["stages"].get(name)

    def record_stage(
        self,
        name: str,
        *,
        status: str,
        seconds: float,
        inputs: list[Path] = (),
        outputs: list[Path] = (),
        headline: dict[str, Any] | None = None,
    ) -> None:
        self.payload["stages"][name] = {
            "status": status,
            "finished": now(),
            "seconds": round(seconds, 3),
            "inputs": self._hashes(inputs),
            "outputs": self._hashes(outputs),
            "headline": headline or {},
        }
        self.payload["headline"].update(headline or {})
        self.save()

    def _hashes(self, paths) -> dict[str, str]:
        hashes = {}
        for path in paths:
            path = Path(path)
            if path.is_file():
                hashes[str(path.relative_to(self.build_dir))] = sha256_file(path)
        return hashes

    def rebase(self, build_dir: Path) -> None:
        self.build_dir = Path(build_dir)

    def save(self) -> None:
        write_json(self.build_dir / MANIFEST, self.payload)
