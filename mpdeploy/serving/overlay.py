"""Serve a published repository on a server that lacks some of its backends, through an overlay.

`plan_serving` decides per model, from the platform or backend its config names, how the local
server serves it: natively (the server has that backend), through the python backend running the
artifact with a runtime mpdeploy has on this machine (ONNX Runtime, OpenVINO), or not at all (with
the reason and what to do). `overlay_repository` lays that plan out as a temporary repository of
symlinks into the published one plus rewritten configs; the published repository is only read.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from mpdeploy.errors import UserError
from mpdeploy.fileio import pid_alive
from mpdeploy.serving.config import (
    PLAN_PLATFORM,
    PYTHON_BACKEND,
    config_text,
    model_config_pb2,
    model_file_name,
    model_kind,
    mpdeploy_parameters,
    read_config,
)
from mpdeploy.serving.repository import CONFIG_FILE, PYTHON_MODEL_TEMPLATE

OVERLAY_PREFIX = "mpdeploy-serve-overlay-"  # + "<pid>-XXXX" in the temporary directory
RUNNER_PARAMETER = "mpdeploy_runner"  # read by python_model.py
MODEL_FILE_PARAMETER = "mpdeploy_model_file"

NATIVE, PYTHON, NOT_SERVED = "native", "python", "not served"

# A config's `platform`, as the name of the Triton backend that loads it.
_PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    PLAN_PLATFORM: "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
}


@dataclass(frozen=True)
class Runtime:
    """A runtime python_model.py can run a published artifact with, in place of a backend."""

    name: str  # the `mpdeploy_runner` parameter's value
    label: str
    module: str  # what must be importable in the serving environment
    install: str


# Triton backend → the runtime that runs the same artifact inside the python backend.
RUNTIMES = {
    "onnxruntime": Runtime("onnxruntime", "ONNX Runtime", "onnxruntime", "pip install onnxruntime"),
    "openvino": Runtime("openvino", "OpenVINO", "openvino", "pip install 'mpdeploy[openvino]'"),
}


@dataclass(frozen=True)
class ModelRoute:
    """How one model of the published repository is served by the local server."""

    name: str
    kind: str  # platform or backend the published config names
    backend: str  # the Triton backend that kind needs ("" when the config does not parse)
    served_by: str  # NATIVE | PYTHON | NOT_SERVED
    runtime: Runtime | None = None  # PYTHON: what model.py runs the artifact with
    reason: str = ""  # NOT_SERVED: why
    remedy: str = ""  # NOT_SERVED: what to do

    def describe(self) -> str:
        if self.served_by == NATIVE and not self.backend:
            return "config.pbtxt does not parse: given to the server as published, which says why"
        if self.served_by == NATIVE:
            return f"{self.kind} → this server's {self.backend} backend"
        if self.served_by == PYTHON:
            return (
                f"{self.kind} → python backend running {self.runtime.label} "
                f"(no {self.backend} backend in this server)"
            )
        return f"{self.kind} → not servable here: {self.reason}. To serve it, {self.remedy}"


@dataclass(frozen=True)
class ServingPlan:
    repo: Path
    routes: tuple[ModelRoute, ...]

    @property
    def needs_overlay(self) -> bool:
        # Python-backend models too: the server's python stub writes model.py's __pycache__
        # beside it (it ignores PYTHONDONTWRITEBYTECODE), which must not land in the repository.
        return any(
            route.served_by == PYTHON or route.backend == PYTHON_BACKEND for route in self.routes
        )

    def route(self, name: str) -> ModelRoute | None:
        return next((r for r in self.routes if r.name == name), None)


def plan_serving(
    repo: str | os.PathLike,
    server_backends: Collection[str],
    *,
    gpu_names: Callable[[], list[str]] | None = None,
) -> ServingPlan:
    """One route per model folder of `repo`, for a server whose backends are `server_backends`.

    `gpu_names` lists this machine's NVIDIA GPUs; it is asked only when a TensorRT plan is found.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(f"{repo}: model repository not found")
    backends = frozenset(server_backends)
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    routes = tuple(_route(folder, backends, gpu_names or _gpu_names) for folder in folders)
    return ServingPlan(repo, routes)


def _route(model_dir: Path, backends: frozenset[str], gpu_names) -> ModelRoute:
    name = model_dir.name
    try:
        config = read_config(model_dir / CONFIG_FILE)
    except UserError:
        # Served as it is, so that the server itself reports what is wrong with it.
        return ModelRoute(name, "unreadable config", "", NATIVE)
    kind = model_kind(config)
    backend = config.backend or _PLATFORM_BACKENDS.get(config.platform, config.platform)
    if backend in backends:
        return ModelRoute(name, kind, backend, NATIVE)
    if backend == _PLATFORM_BACKENDS[PLAN_PLATFORM]:
        return _plan_route(name, kind, backend, mpdeploy_parameters(config), gpu_names)
    other_server = f"use a Triton that has the {backend} backend (NGC tritonserver image)"
    runtime = RUNTIMES.get(backend)
    if runtime is None:
        reason = f"no {backend} backend in this server, and mpdeploy cannot run {kind} itself"
        return ModelRoute(name, kind, backend, NOT_SERVED, reason=reason, remedy=other_server)
    if PYTHON_BACKEND not in backends:
        reason = f"this server has neither the {backend} nor the python backend"
        return ModelRoute(name, kind, backend, NOT_SERVED, reason=reason, remedy=other_server)
    if importlib.util.find_spec(runtime.module) is None:
        reason = f"no {backend} backend in this server, and {runtime.module} is not installed here"
        remedy = f"`{runtime.install}` and serve again, or {other_server}"
        return ModelRoute(name, kind, backend, NOT_SERVED, reason=reason, remedy=remedy)
    return ModelRoute(name, kind, backend, PYTHON, runtime=runtime)


def _plan_route(name: str, kind: str, backend: str, parameters: dict, gpu_names) -> ModelRoute:
    built_for = ", ".join(
        f"{label} {parameters[key]}"
        for key, label in (("mpdeploy_gpu_name", "GPU"), ("mpdeploy_tensorrt_version", "TensorRT"))
        if parameters.get(key)
    )
    built_for = f" (built for {built_for})" if built_for else ""
    if not gpu_names():
        reason = f"a TensorRT plan runs only on an NVIDIA GPU{built_for}, and this machine has none"
    else:
        reason = (
            f"no tensorrt backend in this server{built_for}, and mpdeploy's python backend "
            "runs ONNX, not TensorRT plans"
        )
    remedy = (
        "use a Triton that has the tensorrt backend and the same TensorRT version, on that GPU "
        "(NGC tritonserver image); to serve on this machine, publish an ONNX Runtime build of "
        "the model (`mpdeploy build --backend onnxruntime --triton-repo R`)"
    )
    return ModelRoute(name, kind, backend, NOT_SERVED, reason=reason, remedy=remedy)


def _gpu_names() -> list[str]:
    from mpdeploy.hardware import gpu_devices

    return [device["name"] for device in gpu_devices()]


# ── the overlay repository ─────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def overlay_repository(plan: ServingPlan) -> Iterator[Path]:
    """The repository to give the server, removed on exit: `plan.repo` itself when no model runs
    in the python backend, else a temporary overlay holding only the servable models.

    Natively served models are symlinks to their published folders (python-backend ones are
    mirrored file by file, so that the stub's __pycache__ stays in the overlay); models served in
    the python backend in place of their own get a rewritten config and version folders of
    symlinks to the published files, plus model.py.
    """
    if not plan.needs_overlay:
        yield plan.repo
        return
    remove_stale_overlays()
    root = Path(tempfile.mkdtemp(prefix=f"{OVERLAY_PREFIX}{os.getpid()}-"))
    try:
        for route in plan.routes:
            source = (plan.repo / route.name).resolve()
            if route.served_by == NATIVE and route.backend != PYTHON_BACKEND:
                (root / route.name).symlink_to(source, target_is_directory=True)
            elif route.served_by == NATIVE:
                _mirror_model(source, root / route.name)
            elif route.served_by == PYTHON:
                _write_python_model(source, root / route.name, route.runtime)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def python_config(config, runtime: Runtime, model_file: str):
    """The published config, served by the python backend running `runtime` on CPU.

    Name, versions policy, inputs, outputs (with labels), max_batch_size, batching, warm-up and
    parameters stay as published; what belonged to the replaced backend goes.
    """
    pb2 = model_config_pb2()
    served = pb2.ModelConfig()
    served.CopyFrom(config)
    served.ClearField("platform")
    served.backend = PYTHON_BACKEND
    served.ClearField("default_model_filename")  # for the python backend it names model.py
    served.ClearField("optimization")  # execution accelerators of the replaced backend
    for group in served.instance_group:
        group.kind = pb2.ModelInstanceGroup.Kind.KIND_CPU
        group.ClearField("gpus")
    served.parameters[RUNNER_PARAMETER].string_value = runtime.name
    served.parameters[MODEL_FILE_PARAMETER].string_value = model_file
    return served


def _write_python_model(source: Path, target: Path, runtime: Runtime) -> None:
    config = read_config(source / CONFIG_FILE)
    served = python_config(config, runtime, model_file_name(config))
    template = (importlib.resources.files("mpdeploy.serving") / PYTHON_MODEL_TEMPLATE).read_bytes()
    _mirror_model(source, target, config=config_text(served), model_py=template)


def _mirror_model(
    source: Path, target: Path, *, config: str | None = None, model_py: bytes | None = None
) -> None:
    """`target` as symlinks to `source`'s entries, version folders file by file; `config` and
    `model_py`, when given, replace the published config.pbtxt and each version's model.py."""
    target.mkdir()
    for entry in source.iterdir():
        if entry.name.startswith("."):
            continue  # hidden: a version being published right now
        if entry.name == CONFIG_FILE and config is not None:
            (target / CONFIG_FILE).write_text(config)
        elif entry.is_dir() and entry.name.isdigit():
            version = target / entry.name
            version.mkdir()
            for file in entry.iterdir():
                if file.name == "__pycache__" or (file.name == "model.py" and model_py):
                    continue  # the stub writes its own __pycache__ into the overlay
                (version / file.name).symlink_to(file)
            if model_py is not None:
                (version / "model.py").write_bytes(model_py)
        else:
            (target / entry.name).symlink_to(entry)  # config, labels.txt and anything beside


def remove_stale_overlays() -> None:
    """Remove overlays left by a `serve` that was killed (its process id is gone)."""
    pattern = re.compile(rf"{re.escape(OVERLAY_PREFIX)}(\d+)-[^/]+")
    for path in Path(tempfile.gettempdir()).glob(f"{OVERLAY_PREFIX}*"):
        match = pattern.fullmatch(path.name)
        if match and not pid_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
