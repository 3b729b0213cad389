"""Publish a parity-checked build into a Triton model repository, one immutable version at a time.

Layout written for a model NAME (see docs/serving.md):

    REPO/NAME/config.pbtxt              Triton's config, printed from a typed ModelConfig
    REPO/NAME/labels.txt                class names, one a line (classifiers)
    REPO/NAME/<v>/model.onnx | model.plan | model.py + model.onnx   (+ external weight files)
    REPO/NAME/<v>/mpdeploy/             provenance: artifact.json, engine.json, manifest.json,
                                        parity_report.json, bench.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.resources
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mpdeploy.backends.base import EngineRecord, TritonServing
from mpdeploy.errors import ParityError, UserError
from mpdeploy.fileio import (
    atomic_dir,
    read_json,
    remove_stale_debris,
    sha256_file,
    write_json,
    write_text,
)
from mpdeploy.locks import exclusive, repository_lock_path
from mpdeploy.manifest import Manifest
from mpdeploy.serving.config import (
    PYTHON_BACKEND,
    build_config,
    config_text,
    model_kind,
    mpdeploy_parameters,
    read_config,
    tensor_signature,
)
from mpdeploy.serving.tensors import OnnxSignature, TensorSpec, read_onnx_signature

SIDECAR_DIR = "mpdeploy"  # inside each version folder; Triton only loads the model file
ARTIFACT_RECORD = "artifact.json"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
PYTHON_MODEL_TEMPLATE = "python_model.py"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


@dataclass(frozen=True)
class PublishedModel:
    """Where a build landed in the repository and how it is served."""

    name: str
    version: int
    kind: str  # onnxruntime_onnx | tensorrt_plan | openvino | python
    max_batch_size: int
    model_dir: Path
    version_dir: Path
    config_written: bool  # False when an existing, compatible config.pbtxt was kept as it was

    @property
    def config_path(self) -> Path:
        return self.model_dir / CONFIG_FILE


@dataclass(frozen=True)
class _Build:
    """What publishing needs from a verified build directory."""

    path: Path
    engine: dict
    manifest: dict
    artifact: Path  # the file parity verified: model.onnx, model.fp16.onnx or engine/model.plan
    signature: OnnxSignature  # of the artifact, or of the ONNX a plan was built from
    profile_max: int


def publish(
    build_dir: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    python_backend: bool = False,
    max_batch: int | None = None,
    instance_count: int = 1,
) -> PublishedModel:
    """Publish the parity-verified artifact of `build_dir` as the next version of a Triton model.

    Every check runs before anything is written, so a refused publish leaves `repo` untouched.
    """
    build = _read_build(Path(build_dir))
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise UserError(f"{repo}: the model repository path is a file, not a directory")
    serving = _serving(build, python_backend)
    kind = serving.kind
    name = validate_model_name(name if name is not None else default_model_name(build, kind))
    max_batch_size = _max_batch_size(build, max_batch)
    if instance_count < 1:
        raise UserError(f"instance count must be at least 1, got {instance_count}")

    labels = _class_labels(build)
    config = build_config(
        name,
        kind,
        build.signature.inputs,
        build.signature.outputs,
        max_batch_size=max_batch_size,
        instance_kind=serving.instance_kind,
        instance_count=instance_count,
        label_filename=LABELS_FILE if labels else None,
        parameters=serving.parameters,
        output_data_type="TYPE_FP32" if kind == PYTHON_BACKEND else None,
        gpu_accelerators=serving.gpu_accelerators,
    )
    model_dir = repo / name
    with exclusive(repository_lock_path(repo), f"Triton repository {repo}"):
        remove_stale_debris(repo, name)
        if model_dir.is_dir():
            remove_stale_debris(model_dir)
        existing = _existing_config(model_dir)
        if existing is None:
            return _add_model(model_dir, build, kind, config, labels)
        _require_compatible(existing, config, model_dir, build, max_batch)
        return _add_version(model_dir, build, kind, existing.max_batch_size)


def validate_model_name(name: str) -> str:
    """A Triton model name that is also one safe directory name."""
    if not name or ".." in name or not _NAME_PATTERN.fullmatch(name):
        raise UserError(
            f"invalid model name {name!r}: use 1 to 128 letters, digits, '_', '-' or '.', "
            "not starting with '.' or '-' and without '..' or path separators"
        )
    return name


def default_model_name(build: _Build, kind: str) -> str:
    """The model alias from the manifest (else the build folder's name), made Triton-safe."""
    model = build.manifest.get("model")
    alias = None
    if isinstance(model, dict):
        alias = model.get("alias") or model.get("name") or model.get("timm_name")
    elif isinstance(model, str):
        alias = model
    base = re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(alias or build.path.resolve().name))
    base = re.sub(r"\.{2,}", ".", base).strip("._-")[:120] or "model"
    # The python variant has another backend, so it cannot share the name of the native one.
    return f"{base}_python" if kind == PYTHON_BACKEND else base


def next_version(model_dir: Path) -> int:
    """One above the highest numeric version folder: versions are never overwritten or reused."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)]
    return max(versions, default=0) + 1


def _is_version(folder_name: str) -> bool:
    # Triton ignores folders that are not numeric or start with 0.
    return folder_name.isdigit() and not folder_name.startswith("0")


# ── reading the build ──────────────────────────────────────────────────────────────────────────


def _read_build(path: Path) -> _Build:
    if not path.is_dir():
        raise UserError(f"{path}: not a build directory")
    _require_parity_pass(path)
    engine = _read_record(path / "engine" / "engine.json", "run `mpdeploy engine` first")
    manifest_path = path / "manifest.json"
    manifest = _read_record(manifest_path, "") if manifest_path.exists() else {}
    Manifest(path, manifest).require_complete()
    artifact = _build_file(path, engine, "artifact")
    onnx_path = artifact if artifact.suffix == ".onnx" else _build_file(path, engine, "onnx")
    signature = read_onnx_signature(onnx_path)
    _require_engine_matches(signature, engine, onnx_path)
    profile_max = _profile_max(engine, path)
    _require_batch_dim(signature, onnx_path)
    return _Build(path, engine, manifest, artifact, signature, profile_max)


def _require_parity_pass(path: Path) -> None:
    report = _read_record(path / "parity" / "report.json", "run `mpdeploy verify` first")
    verdict = report.get("verdict")
    if verdict != "pass":
        raise ParityError(
            f"{path}: parity verdict is {verdict!r}; only a build that passed verify is published"
        )
    expected = report.get("artifact_sha256")
    artifact = path / str(report.get("artifact", ""))
    if expected and artifact.is_file() and sha256_file(artifact) != expected:
        raise ParityError(
            f"{artifact}: changed since verify checked it; run `mpdeploy verify --force` first"
        )


def _read_record(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing" + (f"; {hint}" if hint else ""))
    try:
        record = read_json(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object")
    return record


def _build_file(build: Path, engine: dict, key: str) -> Path:
    relative = engine.get(key)
    parts = PurePosixPath(str(relative or "")).parts
    if not relative or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise UserError(f"{build}/engine/engine.json: {key!r} must be a path inside the build")
    file = build.joinpath(*parts)
    if not file.is_file():
        raise UserError(f"{file}: named by engine.json {key!r} but missing")
    return file


def _require_engine_matches(signature: OnnxSignature, engine: dict, onnx_path: Path) -> None:
    expected = (engine.get("input_name"), engine.get("output_name"))
    actual = (signature.inputs[0].name, signature.outputs[0].name) if signature.inputs else None
    if len(signature.inputs) != 1 or len(signature.outputs) != 1 or actual != expected:
        raise UserError(
            f"{onnx_path}: inputs {[s.name for s in signature.inputs]} and outputs "
            f"{[s.name for s in signature.outputs]} do not match engine.json {expected}"
        )


def _require_batch_dim(signature: OnnxSignature, onnx_path: Path) -> None:
    for spec in signature.inputs + signature.outputs:
        if not spec.shape or spec.shape[0] != -1:
            raise UserError(
                f"{onnx_path}: {spec.name!r} has shape {list(spec.shape)}; mpdeploy serves models "
                "with a dynamic batch dim (re-run `mpdeploy export`)"
            )


def _profile_max(engine: dict, build: Path) -> int:
    profile = engine.get("profile") or {}
    value = profile.get("max", engine.get("max_batch"))
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{build}/engine/engine.json: no valid batch profile max ({value!r})")
    return value


def _serving(build: _Build, python_backend: bool) -> TritonServing:
    """How Triton serves this build, as its backend says; or the python-backend variant, which
    runs the same artifact with the runtime the backend names (`mpdeploy_runner`)."""
    from mpdeploy.backends import get_backend

    name = build.engine.get("backend")
    try:
        backend = get_backend(str(name), require_available=False)
    except UserError:
        raise UserError(f"{build.path}/engine/engine.json: unknown backend {name!r}") from None
    try:  # the backend owns its config entries (e.g. what a TensorRT plan is locked to)
        serving = backend.triton(EngineRecord.from_dict(build.engine, partial=True))
    except UserError as exc:
        raise UserError(f"{build.path}/{exc}") from None
    if not python_backend:
        return serving
    if serving.python_runner is None:
        raise UserError(
            f"{build.path}: the python-backend variant runs ONNX Runtime or OpenVINO on the CPU, "
            f"but this build's verified artifact is a {name} {build.artifact.name}; publish it "
            "without it"
        )
    parameters = {
        **serving.parameters,
        "mpdeploy_runner": serving.python_runner,
        "mpdeploy_model_file": serving.model_file,
    }
    return dataclasses.replace(
        serving,
        kind=PYTHON_BACKEND,
        instance_kind="KIND_CPU",
        parameters=parameters,
        gpu_accelerators=(),
    )


def _max_batch_size(build: _Build, requested: int | None) -> int:
    if requested is None:
        return build.profile_max
    if requested < 1 or requested > build.profile_max:
        raise UserError(
            f"max batch {requested} is outside the engine's batch profile 1..{build.profile_max}; "
            "a larger max_batch_size would make Triton send batches the engine rejects"
        )
    return requested


def _class_labels(build: _Build) -> list[str]:
    """Class names for a classifier's logits; empty when the output is not one class vector."""
    output = build.signature.outputs[0]
    if len(output.shape) != 2 or output.shape[1] < 1:
        return []
    num_classes = output.shape[1]
    model = build.manifest.get("model")
    names = model.get("class_names") if isinstance(model, dict) else None
    if isinstance(names, list) and len(names) == num_classes:
        labels = [str(n) for n in names]
    elif num_classes == 1000:
        labels = _imagenet_labels()
    else:
        labels = [str(i) for i in range(num_classes)]
    return [" ".join(label.split()) or str(i) for i, label in enumerate(labels)]


def _imagenet_labels() -> list[str]:
    from mpdeploy._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_descriptions())


# ── writing the repository ─────────────────────────────────────────────────────────────────────


def _existing_config(model_dir: Path):
    if not model_dir.exists():
        return None
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: exists and is not a model directory")
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(
            f"{model_dir}: exists without a {CONFIG_FILE}; remove it or publish under another name"
        )
    return read_config(config_path)


def _require_compatible(existing, new, model_dir: Path, build: _Build, requested_batch) -> None:
    """A new version must be servable under the config that is already there."""
    reasons = []
    if model_kind(existing) != model_kind(new):
        reasons.append(f"serves {model_kind(existing)}, this build is {model_kind(new)}")
    for field in ("input", "output"):
        old, fresh = (
            tensor_signature(getattr(existing, field)),
            tensor_signature(getattr(new, field)),
        )
        if old != fresh:
            reasons.append(f"{field}s {old} ≠ {fresh}")
    if existing.max_batch_size > build.profile_max:
        reasons.append(
            f"max_batch_size {existing.max_batch_size} exceeds this engine's profile max "
            f"{build.profile_max}"
        )
    if requested_batch is not None and requested_batch != existing.max_batch_size:
        reasons.append(f"max_batch_size {existing.max_batch_size} ≠ requested {requested_batch}")
    old_params, new_params = mpdeploy_parameters(existing), mpdeploy_parameters(new)
    if old_params != new_params:
        reasons.append(f"engine parameters {old_params} ≠ {new_params}")
    if reasons:
        raise UserError(
            f"{model_dir / CONFIG_FILE} is incompatible with this build ({'; '.join(reasons)}); "
            "publish under another name or remove the model"
        )


def _add_model(model_dir: Path, build: _Build, kind: str, config, labels) -> PublishedModel:
    """A new model: config, labels and version 1 appear together in one rename."""
    with _committed(model_dir) as stage:
        write_text(stage / CONFIG_FILE, config_text(config))
        if labels:
            write_text(stage / LABELS_FILE, "".join(f"{label}\n" for label in labels))
        _write_version(stage / "1", build, kind, model_dir.name, 1)
    return PublishedModel(
        model_dir.name, 1, kind, config.max_batch_size, model_dir, model_dir / "1", True
    )


def _add_version(model_dir: Path, build: _Build, kind: str, max_batch_size: int) -> PublishedModel:
    """The next version of a model, served under the config already there."""
    version = next_version(model_dir)
    with _committed(model_dir / str(version)) as stage:
        _write_version(stage, build, kind, model_dir.name, version)
    version_dir = model_dir / str(version)
    return PublishedModel(
        model_dir.name, version, kind, max_batch_size, model_dir, version_dir, False
    )


@contextlib.contextmanager
def _committed(target: Path) -> Iterator[Path]:
    """atomic_dir, reporting a concurrent writer of the same folder as a UserError."""
    try:
        with atomic_dir(target) as stage:
            yield stage
    except FileExistsError as exc:
        raise UserError(f"{target}: appeared while publishing; publish again") from exc


def _write_version(stage: Path, build: _Build, kind: str, name: str, version: int) -> None:
    stage.mkdir(exist_ok=True)
    serving = _serving(build, kind == PYTHON_BACKEND)
    model_file = serving.model_file
    shutil.copyfile(build.artifact, stage / model_file)
    if build.artifact.suffix == ".onnx":
        for relative in build.signature.external_data:
            target = stage.joinpath(*PurePosixPath(relative).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(build.artifact.parent.joinpath(relative), target)
    for relative in serving.extra_files:  # e.g. OpenVINO's model.bin beside model.xml
        shutil.copyfile(
            build.path.joinpath(*PurePosixPath(relative).parts), stage / Path(relative).name
        )
    if kind == PYTHON_BACKEND:
        template = importlib.resources.files("mpdeploy.serving") / PYTHON_MODEL_TEMPLATE
        (stage / "model.py").write_bytes(template.read_bytes())
    _write_provenance(stage / SIDECAR_DIR, build, kind, name, version, stage / model_file)


def _write_provenance(
    sidecar: Path, build: _Build, kind: str, name: str, version: int, served_file: Path
) -> None:
    sidecar.mkdir()
    write_json(
        sidecar / ARTIFACT_RECORD,
        {
            "name": name,
            "version": version,
            "kind": kind,
            "file": served_file.name,
            "extra_files": [
                Path(p).name for p in _serving(build, kind == PYTHON_BACKEND).extra_files
            ],
            "sha256": sha256_file(served_file),
            "external_data": list(build.signature.external_data)
            if build.artifact.suffix == ".onnx"
            else [],
            "inputs": [s.to_json() for s in build.signature.inputs],
            "outputs": [s.to_json() for s in build.signature.outputs],
            "profile_max": build.profile_max,
            # what the model computes beyond its weights (token merging changes token counts)
            "token_merging": _token_merging(build),
            "build_dir": str(build.path.resolve()),
            "published_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        },
    )
    copies = {
        "manifest.json": build.path / "manifest.json",
        "model.json": build.path / "pruned" / "model.json",
        "engine.json": build.path / "engine" / "engine.json",
        "parity_report.json": build.path / "parity" / "report.json",
        "bench.json": build.path / "bench.json",
    }
    for target, source in copies.items():
        if source.is_file():
            shutil.copyfile(source, sidecar / target)


def _token_merging(build: _Build) -> dict | None:
    """The ToMe settings the served model was built with (pruned/model.json), or None."""
    try:
        return read_json(build.path / "pruned" / "model.json").get("tome")
    except (OSError, ValueError):
        return None


def read_artifact_record(version_dir: Path) -> dict | None:
    """The sidecar publish wrote into a version folder, or None if there is none."""
    path = version_dir / SIDECAR_DIR / ARTIFACT_RECORD
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def artifact_inputs_outputs(record: dict) -> OnnxSignature:
    return OnnxSignature(
        tuple(TensorSpec.from_json(r) for r in record.get("inputs", [])),
        tuple(TensorSpec.from_json(r) for r in record.get("outputs", [])),
        tuple(record.get("external_data", [])),
    )
