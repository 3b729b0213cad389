"""Helpers shared by test modules (imported as `_helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import socket
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


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (bound together, then closed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
