"""Helpers shared by test modules (imported as `_helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def polygraphy_recheck(build_dir: Path, onnx: str = "model.onnx") -> subprocess.CompletedProcess:
    """The README's independent re-check, with Polygraphy's own default (1e-5) tolerances."""
    polygraphy = str(Path(sys.executable).with_name("polygraphy"))
    return subprocess.run(
        [
            polygraphy,
            "run",
            onnx,
            "--onnxrt",
            "--load-inputs",
            "parity/inputs.json",
            "--load-outputs",
            "parity/reference.json",
        ],
        cwd=build_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
