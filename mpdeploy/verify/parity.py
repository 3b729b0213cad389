"""Parity of an engine with its PyTorch model on the calibration inputs, through Polygraphy.

Writes Polygraphy-native evidence so the check can be re-run independently:
`polygraphy run model.onnx --onnxrt --load-inputs parity/inputs.json --load-outputs parity/reference.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpdeploy.backends.base import PRECISION_TOLERANCES
from mpdeploy.errors import ParityError
from mpdeploy.export.onnx import INPUT_NAME, OUTPUT_NAME
from mpdeploy.fileio import atomic_path, read_json, sha256_file, write_json
from mpdeploy.verify.certificate import margin_certificate

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")

PARITY_DIR = "parity"
# Tolerances by precision live with the backends (a backend may state its own); this is the table.
TOLERANCES: dict[str, dict[str, float]] = PRECISION_TOLERANCES
MAX_PARITY_INPUT_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class ParityReport:
    verdict: str  # "pass" | "fail"
    backend: str
    precision: str
    artifact: str
    artifact_sha256: str  # the verdict belongs to exactly this file
    samples: int
    batch_size: int
    tolerances: dict[str, float]
    outputs: dict[str, dict[str, float]]
    polygraphy_passed: bool
    top1_agreement: float
    certificate: dict[str, Any]
    recheck_command: str
    # token merging: inputs whose merge decisions differ between reference and engine, never
    # hidden; left out of the elementwise check only when they fail it (top-1 still counts them)
    merge_decisions: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def parity_feeds(images: torch.Tensor, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Calibration images as Polygraphy feed dicts, capped so the saved JSON stays reasonable."""
    per_image = images[0].numel() * 4
    limit = max(1, min(images.shape[0], MAX_PARITY_INPUT_BYTES // per_image))
    data = images[:limit].numpy().astype(np.float32)
    return [{INPUT_NAME: data[i : i + batch_size]} for i in range(0, limit, batch_size)]


def verify_engine(
    model: torch.nn.Module,
    engine_runner,
    images: torch.Tensor,
    build_dir: Path,
    *,
    backend: str,
    precision: str,
    artifact: str,
    batch_size: int = 16,
    tolerances: dict[str, float] | None = None,
    recheck_command: str | None = None,
    merge_flips: Any = None,
) -> ParityReport:
    """Run reference and engine on the same inputs, compare, write parity/*.json, return the report.

    `merge_flips(feeds)` (token-merging models) returns, per input, whether the engine merged
    other tokens than the reference: a last-bit difference can flip a discrete choice. Those
    inputs are counted in the report. If every input passes the elementwise check, the changed
    merges did not matter and parity passes; otherwise the changed inputs are left out of the
    elementwise check and the rest must pass it, with the tolerances unchanged (and at least one
    input must be left to check). Top-1 agreement is always over every input.
    """
    from polygraphy.comparator import Comparator, CompareFunc, RunResults
    from polygraphy.json import save_json

    from mpdeploy.backends.torch_runner import TorchRunner

    out_dir = Path(build_dir) / PARITY_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds = parity_feeds(images, batch_size)
    tol = dict(tolerances or TOLERANCES[precision])

    torch_runner = TorchRunner(model, tuple(images.shape[1:]), name="pytorch-reference")
    with quiet_polygraphy():
        reference = Comparator.run([torch_runner], data_loader=feeds)
        results = Comparator.run([engine_runner], data_loader=feeds)

    with quiet_polygraphy():
        with atomic_path(out_dir / "inputs.json") as tmp:
            save_json(feeds, str(tmp), description="parity inputs")
        with atomic_path(out_dir / "reference.json") as tmp:
            reference.save(str(tmp))
        with atomic_path(out_dir / "results.json") as tmp:
            results.save(str(tmp))

    combined = RunResults()
    for runner_name, iterations in list(reference.items()) + list(results.items()):
        combined.append((runner_name, iterations))
    with quiet_polygraphy():
        accuracy = Comparator.compare_accuracy(
            combined,
            compare_func=CompareFunc.simple(
                atol=tol["atol"], rtol=tol["rtol"], check_error_stat="elemwise"
            ),
        )
    polygraphy_passed = bool(accuracy)

    ref = _stack_outputs(reference)
    got = _stack_outputs(results)
    outputs = {name: _error_stats(ref[name], got[name]) for name in ref}
    cert = margin_certificate(ref[OUTPUT_NAME], got[OUTPUT_NAME])
    top1 = cert["top1_agreement"]
    elementwise_passed, decisions = polygraphy_passed, None
    if merge_flips is not None:
        flips = np.asarray(merge_flips(feeds), dtype=bool)
        same = ~flips
        on_unchanged = bool(
            same.any() and all(_within(ref[n][same], got[n][same], tol) for n in ref)
        )
        elementwise_passed = polygraphy_passed or on_unchanged
        decisions = {
            "inputs": int(flips.size),
            "inputs_with_changed_merges": int(flips.sum()),
            "changed_inputs": np.flatnonzero(flips).tolist(),
            "elementwise_checked_inputs": int(same.sum()),
            "elementwise_passed_on_all": polygraphy_passed,
            "elementwise_passed_on_unchanged": on_unchanged,
            "max_abs_on_unchanged": float(
                max(np.abs(ref[n][same] - got[n][same]).max() for n in ref)
            )
            if same.any()
            else None,
        }
    verdict = elementwise_passed and top1 >= tol["min_top1_agreement"]
    report = ParityReport(
        verdict="pass" if verdict else "fail",
        backend=backend,
        precision=precision,
        artifact=artifact,
        artifact_sha256=sha256_file(Path(build_dir) / artifact),
        samples=int(ref[OUTPUT_NAME].shape[0]),
        batch_size=batch_size,
        tolerances=tol,
        outputs=outputs,
        polygraphy_passed=polygraphy_passed,
        top1_agreement=top1,
        certificate=cert,
        merge_decisions=decisions,
        recheck_command=recheck_command
        or (
            f"polygraphy run {artifact} --onnxrt --load-inputs parity/inputs.json "
            f"--load-outputs parity/reference.json --atol {tol['atol']} --rtol {tol['rtol']}"
        ),
    )
    write_json(out_dir / "report.json", report.to_dict())
    return report


@contextlib.contextmanager
def quiet_polygraphy():
    """Polygraphy logs every comparison at INFO; our report carries the figures instead."""
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.WARNING
    G_LOGGER.colors = False  # otherwise it warns that the optional 'colored' module is missing
    try:
        yield
    finally:
        G_LOGGER.module_severity = previous


def _stack_outputs(results) -> dict[str, np.ndarray]:
    (_, iterations), *_ = list(results.items())
    names = list(iterations[0].keys())
    return {
        n: np.concatenate([np.asarray(it[n], dtype=np.float64) for it in iterations]) for n in names
    }


def _within(ref: np.ndarray, got: np.ndarray, tol: dict[str, float]) -> bool:
    """Polygraphy's elementwise rule: an element fails when both its errors exceed tolerance."""
    diff = np.abs(ref - got)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    return bool(np.isfinite(got).all() and not ((diff > tol["atol"]) & (rel > tol["rtol"])).any())


def _error_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    diff = np.abs(ref - got)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    cos = float((ref * got).sum() / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(rel.max()),
        "median_rel": float(np.median(rel)),
        "cosine_similarity": cos,
    }


def read_parity_report(build_dir: Path) -> dict[str, Any]:
    return read_json(Path(build_dir) / PARITY_DIR / "report.json")


def require_pass(report: ParityReport) -> None:
    if not report.passed:
        worst = max(report.outputs.values(), key=lambda s: s["max_abs"])
        raise ParityError(
            f"parity FAILED for {report.artifact} ({report.precision}): max abs error "
            f"{worst['max_abs']:.3g} (atol {report.tolerances['atol']}, rtol "
            f"{report.tolerances['rtol']}), top-1 agreement {report.top1_agreement:.2%}; "
            "see parity/report.json"
        )
