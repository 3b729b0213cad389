"""Hostile inputs and faults across every command: one stderr line, the right exit code, no
traceback, and a workspace whose file tree hashes the same before and after.

All cases run in one fresh interpreter (tests/_hostile_worker.py) with stderr captured at the
file-descriptor level, so warnings from libraries and logging count too. Two cases meet a lock
that this test process holds (a second, real writer) and one a port it is listening on.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from _reliability import cli_env, complete_build, set_stage

from mpdeploy.locks import build_lock_path, exclusive, repository_lock_path

BUSY, USAGE, MISSING = 5, 2, 4
B = ["build", "--model", "test_vit", "--weights", "vit.safetensors", "--calib-size", "4"]
BN = ["build", "--model", "test_vit", "--weights", "none"]

# (id, argv, exit code, a fragment of the one line). {port} is a port this test listens on.
CASES = [
    # build: names, numbers and sizes
    ("unknown-model", ["build", "--model", "no_such_model_xyz"], USAGE, "unknown model"),
    ("newline-in-model", ["build", "--model", "test\nvit"], USAGE, "control characters"),
    ("target-macs-5", [*BN, "--target-macs", "5"], USAGE, "--target-macs must be in"),
    ("target-macs-negative", [*BN, "--target-macs", "-0.1"], USAGE, "--target-macs must be in"),
    ("sparsity-9:4", [*BN, "--sparsity", "9:4"], USAGE, "need 0 < k < n"),
    ("sparsity-words", [*BN, "--sparsity", "two:four"], USAGE, "must look like k:n"),
    ("method-bogus", [*BN, "--method", "bogus"], USAGE, "Invalid value for '--method'"),
    ("precision-int4", [*BN, "--precision", "int4"], USAGE, "Invalid value for '--precision'"),
    ("max-batch-0", [*BN, "--max-batch", "0"], USAGE, "--max-batch must be at least 1"),
    ("calib-size-0", [*BN, "--calib-size", "0"], USAGE, "--calib-size must be in"),
    ("calib-size-1e9", [*BN, "--calib-size", "1000000000"], USAGE, "--calib-size must be in"),
    ("calib-refine-negative", [*BN, "--calib-refine", "-1"], USAGE, "--calib-refine must be in"),
    ("calib-refine-no-norms", [*BN, "--calib-refine", "2"], USAGE, "has no BatchNorm2d layer"),
    ("img-size-7", [*BN, "--img-size", "7"], USAGE, "--img-size must be in"),
    ("img-size-100000", [*BN, "--img-size", "100000"], USAGE, "--img-size must be in"),
    (
        "calibration-memory",
        [*BN, "--img-size", "2048", "--calib-size", "100000"],
        USAGE,
        "GiB available",
    ),
    ("num-classes-0", [*BN, "--num-classes", "0"], USAGE, "--num-classes must be at least 1"),
    ("bench-batch-0", [*BN, "--bench-batch", "0"], USAGE, "--bench-batch must be at least 1"),
    ("bench-batch-over-max", [*BN, "--max-batch", "4", "--bench-batch", "8"], USAGE, "larger"),
    ("bench-iterations-0", [*BN, "--bench-iterations", "0"], USAGE, "--bench-iterations must"),
    ("round-to-0", [*BN, "--round-to", "0"], USAGE, "--round-to must be"),
    ("seed-not-a-number", [*BN, "--seed", "x"], USAGE, "Invalid value for '--seed'"),
    ("unknown-flag", [*BN, "--bogus-flag"], USAGE, "No such option"),
    ("bad-name", [*BN, "--name", "../evil"], USAGE, "invalid model name"),
    ("name-with-newline", [*BN, "--name", "a\nb"], USAGE, "invalid model name"),
    # build: files
    ("weights-empty", [*BN[:3], "--weights", "empty.pth"], USAGE, "is empty"),
    ("weights-directory", [*BN[:3], "--weights", "ckpt.pth"], USAGE, "is a directory"),
    ("weights-text", [*BN[:3], "--weights", "text.pth"], USAGE, "not a torch checkpoint"),
    ("weights-missing", [*BN[:3], "--weights", "gone.safetensors"], USAGE, "not found"),
    ("weights-suffix", [*BN[:3], "--weights", "notes.txt"], USAGE, "unsupported weights"),
    ("weights-other-model", [*BN[:3], "--weights", "resnet.safetensors"], USAGE, "do not fit"),
    ("hub-offline", [*BN[:3], "--weights", "hub"], USAGE, "cannot load pretrained weights"),
    ("calib-missing", [*BN, "--calib", "nowhere"], USAGE, "calibration folder not found"),
    ("calib-no-images", [*B, "--calib", "emptycalib"], USAGE, "no readable images"),
    ("compensate-unknown", [*BN, "--compensate", "ols"], USAGE, "unknown --compensate"),
    (
        "train-missing",
        [*BN, "--recover-epochs", "1", "--train", "nowhere"],
        USAGE,
        "--train folder not found",
    ),
    ("backend-tensorrt", [*BN, "--backend", "tensorrt"], MISSING, "tensorrt is not available"),
    ("out-under-a-file", [*BN, "--out", "afile/sub"], USAGE, "cannot write to"),
    ("out-exists", [*BN, "--out", "existing"], USAGE, "already exists; pass --force"),
    ("out-locked", [*BN, "--out", "held", "--force"], BUSY, "being written by another"),
    ("repo-malformed", [*BN, "--triton-repo", "badrepo"], USAGE, "not a valid Triton config"),
    ("repo-is-a-file", [*BN, "--triton-repo", "afile"], USAGE, "is a file"),
    # spectrum
    ("spectrum-unknown", ["spectrum", "--model", "nope_model"], USAGE, "unknown model"),
    ("spectrum-img-size", ["spectrum", "--model", "test_vit", "--img-size", "7"], USAGE, "img"),
    # one-stage commands: refused before anything runs (the manifest stays byte-identical)
    (
        "prune-target-5",
        ["prune", "--build", "build", "--force", "--target-macs", "5"],
        USAGE,
        "mac",
    ),
    (
        "prune-method",
        ["prune", "--build", "build", "--force", "--method", "bogus"],
        USAGE,
        "method",
    ),
    ("prune-9:4", ["prune", "--build", "build", "--force", "--sparsity", "9:4"], USAGE, "k < n"),
    (
        "prune-compensate-inputs",
        ["prune", "--build", "build", "--force", "--compensate-inputs", "sideways"],
        USAGE,
        "compensate-inputs",
    ),
    (
        "prune-train-missing",
        ["prune", "--build", "build", "--force", "--recover-epochs", "1", "--train", "nowhere"],
        USAGE,
        "--train folder not found",
    ),
    ("prune-done", ["prune", "--build", "build"], USAGE, "pass --force"),
    ("export-int4", ["export", "--build", "build", "--force", "--precision", "int4"], USAGE, "fp"),
    ("engine-batch-0", ["engine", "--build", "build", "--force", "--max-batch", "0"], USAGE, "max"),
    ("engine-trt", ["engine", "--build", "build", "--force", "--backend", "tensorrt"], MISSING, ""),
    ("bench-iter-0", ["bench", "--build", "build", "--bench-iterations", "0"], USAGE, "iterations"),
    ("verify-corrupt", ["verify", "--build", "corrupt", "--force"], USAGE, "corrupt"),
    ("bench-corrupt", ["bench", "--build", "corrupt"], USAGE, "corrupt"),
    ("verify-list-manifest", ["verify", "--build", "listmanifest"], USAGE, "corrupt"),
    ("verify-not-a-build", ["verify", "--build", "notabuild"], USAGE, "not an mpdeploy build"),
    ("stage-locked", ["bench", "--build", "held_build"], BUSY, "being written by another"),
    # eval
    ("eval-corrupt", ["eval", "--build", "corrupt", "--data", "demo"], USAGE, "corrupt"),
    (
        "eval-batch-0",
        ["eval", "--build", "build", "--data", "demo", "--batch-size", "0"],
        USAGE,
        "",
    ),
    ("eval-no-data", ["eval", "--build", "build", "--data", "nowhere"], USAGE, "not found"),
    # package
    ("package-no-args", ["package"], USAGE, "package needs --build"),
    ("package-failed-stage", ["package", "--build", "failedbuild", "--triton-repo", "repo"], 2, ""),
    ("package-stale-stage", ["package", "--build", "stalebuild", "--triton-repo", "repo"], 2, ""),
    ("package-bad-name", ["package", "--build", "build", "--triton-repo", "repo", "--name", "a/b"]),
    ("package-repo-file", ["package", "--build", "build", "--triton-repo", "afile"], 2, "a file"),
    (
        "package-locked",
        ["package", "--build", "build", "--triton-repo", "heldrepo"],
        BUSY,
        "Triton",
    ),
    ("package-corrupt", ["package", "--build", "badmanifest", "--triton-repo", "repo"], 2, "JSON"),
    # serve: ports are checked before anything starts
    ("serve-port-99999", ["serve", "--repo", "repo", "--http-port", "99999"], USAGE, "1..65535"),
    ("serve-port-0", ["serve", "--repo", "repo", "--grpc-port", "0"], USAGE, "1..65535"),
    ("serve-same-ports", ["serve", "--repo", "repo", "--http-port", "8123", "--grpc-port", "8123"]),
    ("serve-port-taken", ["serve", "--repo", "repo", "--http-port", "{port}"], USAGE, "in use"),
]
EXPECTED_EXTRA = {  # cases whose table row is short: (exit code, fragment)
    "package-bad-name": (USAGE, "invalid model name"),
    "serve-same-ports": (USAGE, "give them two ports"),
    "package-failed-stage": (USAGE, "stage prune is failed"),
    "package-stale-stage": (USAGE, "was redone after"),
}


def _case(row):
    case_id, argv, *expected = row
    code, fragment = expected if expected else EXPECTED_EXTRA[case_id]
    code, fragment = EXPECTED_EXTRA.get(case_id, (code, fragment))
    return case_id, argv, code, fragment


def _workspace(root: Path, base: Path) -> Path:
    """Everything the cases point at; none of it may change."""
    import torch
    from safetensors.torch import save_file

    import mpdeploy.models  # noqa: F401  (torchvision shim)

    root.mkdir()
    import timm

    torch.manual_seed(0)
    for name, arch in (("vit", "test_vit"), ("resnet", "test_resnet")):
        state = timm.create_model(arch).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, root / f"{name}.safetensors")
    (root / "empty.pth").write_bytes(b"")
    (root / "text.pth").write_text("hello, I am not a checkpoint\n")
    (root / "notes.txt").write_text("notes\n")
    (root / "ckpt.pth").mkdir()
    (root / "ckpt.pth" / "weights.bin").write_bytes(b"\0")
    (root / "emptycalib").mkdir()
    (root / "emptycalib" / "readme.txt").write_text("no images here\n")
    (root / "afile").write_text("x\n")
    (root / "existing").mkdir()
    (root / "existing" / "precious.txt").write_text("keep me\n")
    build = complete_build(base, root / "build")
    complete_build(base, root / "held_build")
    set_stage(complete_build(base, root / "failedbuild"), "prune", status="failed")
    set_stage(
        complete_build(base, root / "stalebuild"), "prune", finished="2026-11-27T11:00:00+00:00"
    )
    (complete_build(base, root / "badmanifest") / "manifest.json").write_text("{not json")
    for name, text in (("corrupt", "{not json"), ("listmanifest", "[1, 2]")):
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(text)
    (root / "notabuild").mkdir()
    (root / "badrepo" / "test_vit").mkdir(parents=True)
    (root / "badrepo" / "test_vit" / "config.pbtxt").write_text('name: "test_vit"\ninstance {\n')
    (root / "repo").mkdir()
    (root / "heldrepo").mkdir()
    assert (build / "manifest.json").is_file()
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "serving"  # shared with the serving tests
    root = tmp_path_factory.mktemp("hostile")
    workspace = _workspace(root / "ws", base)
    with ExitStack() as held, socket.socket() as listener:
        # A second writer that really holds the locks, and a port that is really taken.
        held.enter_context(exclusive(build_lock_path(workspace / "held"), "held"))
        held.enter_context(exclusive(build_lock_path(workspace / "held_build"), "held_build"))
        held.enter_context(exclusive(repository_lock_path(workspace / "heldrepo"), "heldrepo"))
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = str(listener.getsockname()[1])
        cases = [
            {"id": cid, "argv": [a.replace("{port}", port) for a in argv]}
            for cid, argv, _, _ in map(_case, CASES)
        ]
        spec = root / "spec.json"
        spec.write_text(
            json.dumps({"workspace": str(workspace), "scratch": str(root), "cases": cases})
        )
        out = root / "results.json"
        worker = Path(__file__).with_name("_hostile_worker.py")
        done = subprocess.run(
            [sys.executable, str(worker), str(spec), str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env=cli_env(),
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_there_are_at_least_forty_cases():
    assert len({row[0] for row in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize(
    "case_id, argv, code, fragment",
    [_case(r) for r in CASES],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_case(results, case_id, argv, code, fragment):
    outcome = results[case_id]
    lines = [line for line in outcome["stderr"].splitlines() if line.strip()]
    assert "Traceback" not in outcome["stderr"], outcome["stderr"]
    assert len(lines) == 1, outcome["stderr"]
    assert lines[0].startswith("mpdeploy: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert outcome["code"] == code, (outcome["code"], lines[0])
    assert outcome["unchanged"], f"{case_id} changed the workspace"
