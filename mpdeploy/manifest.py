"""manifest.json: per-stage records (status, duration, hashes, headline figures) and the environment."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from mpdeploy import __version__
from mpdeploy.fileio import read_json, sha256_file, write_json

MANIFEST = "manifest.json"
_PACKAGES = (
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnxslim",
    "polygraphy",
    "numpy",
    "tensorrt",
    "tritonclient",
    "nvidia-pytriton",
)


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
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu = {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda,
            }
    except Exception:  # a broken CUDA install must not stop a CPU build
        gpu = None
    return {
        "mpdeploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "gpu": gpu,
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
        from mpdeploy.errors import UserError

        path = Path(build_dir) / MANIFEST
        if not path.is_file():
            raise UserError(f"{build_dir} is not an mpdeploy build directory (no {MANIFEST})")
        return cls(build_dir, read_json(path))

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
