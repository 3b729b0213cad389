"""Validate a Triton model repository against Triton's schema and the artifacts it serves.

Each problem is one line, `MODEL/PATH: what is wrong`, relative to the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from mpdeploy.errors import UserError
from mpdeploy.fileio import sha256_file
from mpdeploy.serving.config import (
    ONNX_PLATFORM,
    OPENVINO_BACKEND,
    PLAN_PLATFORM,
    PYTHON_BACKEND,
    model_file_name,
    model_kind,
    parse_config,
    tensor_signature,
)
from mpdeploy.serving.repository import (
    CONFIG_FILE,
    artifact_inputs_outputs,
    read_artifact_record,
)
from mpdeploy.serving.tensors import OnnxSignature, read_onnx_signature


def check_repository(repo: str | os.PathLike) -> list[str]:
    """Every problem found in `repo`; an empty list means Triton should load every model in it."""
    repo = Path(repo)
    if not repo.is_dir():
        return [f"{repo}: not a directory"]
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        return [f"{repo}: no model directories"]
    problems: list[str] = []
    for model_dir in models:
        problems.extend(_check_model(model_dir))
    return problems


def format_problems(problems: list[str], repo: str | os.PathLike | None = None) -> str:
    """For the terminal: one line per problem, or one line saying the repository is valid."""
    where = f"{repo}: " if repo is not None else ""
    if not problems:
        return f"{where}valid Triton model repository"
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    return "\n".join([f"{where}{count}", *(f"  - {p}" for p in problems)])


def _check_model(model_dir: Path) -> list[str]:
    from google.protobuf import text_format

    name = model_dir.name
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        return [f"{name}: no {CONFIG_FILE} (the server runs with --strict-model-config)"]
    try:
        config = parse_config(config_path.read_text())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        return [f"{name}/{CONFIG_FILE}: not a valid Triton config: {' '.join(str(exc).split())}"]
    problems = []
    if config.name and config.name != name:
        problems.append(f"{name}/{CONFIG_FILE}: name {config.name!r} ≠ directory name {name!r}")
    kind = model_kind(config)
    if not kind:
        problems.append(f"{name}/{CONFIG_FILE}: neither platform nor backend is set")
    problems += _check_config_fields(model_dir, config)
    versions = _version_dirs(model_dir, problems)
    for version_dir in versions:
        problems += _check_version(name, config, version_dir)
    return problems


def _version_dirs(model_dir: Path, problems: list[str]) -> list[Path]:
    versions = []
    for entry in sorted(model_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name.isdigit() and not entry.name.startswith("0"):
            versions.append(entry)
        else:
            problems.append(
                f"{model_dir.name}/{entry.name}: not a version folder (Triton loads only "
                "numeric folders without a leading 0)"
            )
    if not versions:
        problems.append(f"{model_dir.name}: no numeric version folder")
    return sorted(versions, key=lambda p: int(p.name))


def _check_config_fields(model_dir: Path, config) -> list[str]:
    where = f"{model_dir.name}/{CONFIG_FILE}"
    problems = []
    if config.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size {config.max_batch_size} is negative")
    too_big = [b for b in config.dynamic_batching.preferred_batch_size if b > config.max_batch_size]
    if too_big:
        problems.append(
            f"{where}: preferred_batch_size {too_big} above max_batch_size {config.max_batch_size}"
        )
    input_names = {i.name for i in config.input}
    for warmup in config.model_warmup:
        if config.max_batch_size and warmup.batch_size > config.max_batch_size:
            problems.append(f"{where}: warm-up {warmup.name!r} batch above max_batch_size")
        unknown = sorted(set(warmup.inputs) - input_names)
        if unknown:
            problems.append(f"{where}: warm-up {warmup.name!r} feeds unknown inputs {unknown}")
    for output in config.output:
        if output.label_filename:
            problems += _check_labels(model_dir, output)
    return problems


def _check_labels(model_dir: Path, output) -> list[str]:
    where = f"{model_dir.name}/{output.label_filename}"
    path = model_dir / output.label_filename
    if not path.is_file():
        return [f"{where}: missing (named by output {output.name!r})"]
    count = len(path.read_text(errors="replace").splitlines())
    classes = output.dims[-1] if output.dims else None
    if classes is not None and classes > 0 and count != classes:
        return [f"{where}: {count} labels for {classes} classes of output {output.name!r}"]
    return []


def _check_version(name: str, config, version_dir: Path) -> list[str]:
    where = f"{name}/{version_dir.name}"
    kind = model_kind(config)
    file_name = model_file_name(config)
    if file_name is None:
        return []  # a backend mpdeploy does not know: nothing more to check
    model_file = version_dir / file_name
    if not model_file.exists():
        return [f"{where}: no {file_name} (required by {kind})"]
    record = read_artifact_record(version_dir)
    problems = _check_integrity(where, version_dir, record)
    signature = _served_signature(where, kind, version_dir, record, problems)
    if signature is not None:
        problems += _compare_tensors(where, config, signature, kind)
    if record is not None and config.max_batch_size > record.get("profile_max", 0):
        problems.append(
            f"{where}: max_batch_size {config.max_batch_size} exceeds the engine's batch profile "
            f"max {record.get('profile_max')}"
        )
    return problems


def _check_integrity(where: str, version_dir: Path, record: dict | None) -> list[str]:
    if record is None:
        return []
    served = version_dir / record.get("file", "")
    if served.is_file() and sha256_file(served) != record.get("sha256"):
        return [f"{where}/{served.name}: changed since it was published (sha256 differs)"]
    return []


def _served_signature(
    where: str, kind: str, version_dir: Path, record: dict | None, problems: list[str]
) -> OnnxSignature | None:
    """The I/O of what this version serves: the ONNX graph itself, or the sidecar for anything
    else (a TensorRT plan, an OpenVINO IR, a python model that runs an IR)."""
    served = (record or {}).get("file", "model.onnx")
    if kind == ONNX_PLATFORM or (kind == PYTHON_BACKEND and served.endswith(".onnx")):
        onnx_file = version_dir / "model.onnx"
        if not onnx_file.is_file():
            if kind == ONNX_PLATFORM or record is not None:
                problems.append(f"{where}: no model.onnx")
            return None
        try:
            return read_onnx_signature(onnx_file)
        except UserError as exc:
            problems.append(f"{where}/model.onnx: {exc}")
            return None
    if kind in (PLAN_PLATFORM, OPENVINO_BACKEND, PYTHON_BACKEND):
        if record is None:
            problems.append(
                f"{where}: no mpdeploy/artifact.json, so the {kind} model's inputs and outputs "
                "cannot be checked without its runtime"
            )
            return None
        problems += [
            f"{where}: no {extra} (published beside {served})"
            for extra in record.get("extra_files", [])
            if not (version_dir / extra).is_file()
        ]
        return artifact_inputs_outputs(record)
    return None


def _compare_tensors(where: str, config, signature: OnnxSignature, kind: str) -> list[str]:
    batched = config.max_batch_size > 0
    problems = []
    for field, specs in (("input", signature.inputs), ("output", signature.outputs)):
        declared = {n: (t, d) for n, t, d in tensor_signature(getattr(config, field))}
        actual = {s.name: (s.data_type, s.dims(batched)) for s in specs}
        if set(declared) != set(actual):
            problems.append(
                f"{where}: config {field}s {sorted(declared)} ≠ model {field}s {sorted(actual)}"
            )
            continue
        for tensor, (data_type, dims) in declared.items():
            real_type, real_dims = actual[tensor]
            # The python model casts its outputs to the declared type.
            type_ok = data_type == real_type or (kind == PYTHON_BACKEND and field == "output")
            if not type_ok:
                problems.append(
                    f"{where}: {field} {tensor!r} is {data_type} in config, {real_type} in model"
                )
            if not _dims_match(dims, real_dims):
                problems.append(
                    f"{where}: {field} {tensor!r} dims {list(dims)} in config, "
                    f"{list(real_dims)} in model"
                )
        if batched:
            problems += [
                f"{where}: {field} {s.name!r} has a fixed first dim {s.shape[0]}, but "
                f"max_batch_size {config.max_batch_size} makes it the batch dim"
                for s in specs
                if s.shape and s.shape[0] > 0 and config.max_batch_size > s.shape[0]
            ]
    return problems


def _dims_match(declared: tuple[int, ...], real: tuple[int, ...]) -> bool:
    # -1 in the model accepts any declared size; -1 in the config needs a dynamic model dim.
    return len(declared) == len(real) and all(
        r == -1 or d == r for d, r in zip(declared, real, strict=True)
    )
