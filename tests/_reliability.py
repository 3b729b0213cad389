"""Helpers for the reliability tests: complete build directories, tree hashes, CLI subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _serving_build import MODEL, copy_build, verified_build

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES_DONE = ("resolve", "calibrate", "analyze", "prune", "export", "engine", "verify")


def complete_build(base: Path, target: Path) -> Path:
    """A copy of the serving tests' verified build with a manifest as `mpdeploy build` writes it."""
    import dataclasses

    from mpdeploy.backends.base import EngineRecord, write_engine_record
    from mpdeploy.pipeline import BuildOptions

    build = copy_build(verified_build(base), target)
    engine = json.loads((build / "engine" / "engine.json").read_text())
    fields = {f.name for f in dataclasses.fields(EngineRecord)}
    engine = {"build_seconds": 0.0, "details": {}, **engine}
    engine["size_bytes"] = (build / engine["artifact"]).stat().st_size
    write_engine_record(EngineRecord(**{k: v for k, v in engine.items() if k in fields}), build)
    manifest = json.loads((build / "manifest.json").read_text())
    options = BuildOptions(model=MODEL, weights="none", calib_size=8, max_batch=4, out=str(build))
    stages = {
        name: {
            "status": "done",
            "finished": f"2026-11-27T10:00:{i:02d}+00:00",
            "seconds": 0.1,
            "inputs": {},
            "outputs": {},
            "headline": {},
        }
        for i, name in enumerate(STAGES_DONE)
    }
    manifest.update(options=options.to_dict(), stages=stages, headline={})
    manifest["model"].setdefault("input_shape", [3, 160, 160])
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return build


def set_stage(build: Path, name: str, **fields) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["stages"][name].update(fields)
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def tree_hash(root: Path) -> str:
    """Names, kinds, modes and contents of everything under `root`, hidden files included."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [d + "/" for d in dirs]:
            path = Path(folder) / name.rstrip("/")
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(oct(path.lstat().st_mode).encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POLYGRAPHY_AUTOINSTALL_DEPS": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`mpdeploy ARGS` as its own process (python -m, so no console script is needed)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mpdeploy.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(**env),
    )


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
