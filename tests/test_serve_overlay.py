"""`mpdeploy serve` serves what `mpdeploy build` publishes, through an overlay where it must.

The bundled tritonserver has only the python backend. Planning and the overlay's layout are
checked without a server; one end-to-end test runs the real `mpdeploy serve` command on a
repository holding an onnxruntime_onnx model (two versions), a python-backend model, a TensorRT
plan and (when OpenVINO is installed) an openvino model, answers the parity inputs over HTTP and
gRPC within the parity tolerances, stops it with SIGTERM, and checks that the overlay is gone and
the published repository is byte for byte what it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _serving_build import make_plan_build, verified_build
from test_serving_e2e import (
    HTTP_TIMEOUTS,
    READY_TIMEOUT_S,
    _read_until,
    free_ports,
    infer,
    parity_cases,
)

from mpdeploy.errors import UserError
from mpdeploy.serving import publish
from mpdeploy.serving.config import parse_config, read_config
from mpdeploy.serving.overlay import (
    NATIVE,
    NOT_SERVED,
    OVERLAY_PREFIX,
    PYTHON,
    overlay_repository,
    plan_serving,
    remove_stale_overlays,
)
from mpdeploy.serving.server import serve

pytest.importorskip(
    "pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed"
)
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

pytestmark = pytest.mark.serve

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
ORT_LINE = (
    "onnxruntime_onnx → python backend running ONNX Runtime (no onnxruntime backend in this server)"
)
OPENVINO_LINE = "openvino → python backend running OpenVINO (no openvino backend in this server)"


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Path:
    return verified_build(tmp_path_factory.getbasetemp() / "serving")


@pytest.fixture(scope="module")
def repo(build, tmp_path_factory) -> Path:
    """What `mpdeploy build --triton-repo R` (run twice) and its variants publish into R."""
    base = tmp_path_factory.mktemp("overlay")
    repo = base / "repo"
    publish(build, repo)
    publish(build, repo)  # version 2 of test_vit: the one Triton serves
    publish(make_plan_build(build, base / "plan"), repo, name="test_vit_plan")
    publish(build, repo, python_backend=True)
    if HAS_OPENVINO:
        _publish_openvino_build(build, base, repo)
    (repo / "broken" / "1").mkdir(parents=True)  # a hand-edited config that no longer parses
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\ninstance_group {'
    )
    return repo


def _publish_openvino_build(build: Path, base: Path, repo: Path) -> None:
    """`--backend openvino --precision fp32` on the same ONNX, published as Triton's openvino
    backend takes it: `backend: "openvino"`, model.xml + model.bin, INFERENCE_PRECISION_HINT f32."""
    from _serving_build import MAX_BATCH, copy_build

    from mpdeploy.backends import EngineOptions, get_backend

    ov_build = copy_build(build, base / "openvino")
    options = EngineOptions(precision="fp32", max_batch=MAX_BATCH)
    get_backend("openvino").build(ov_build / "model.onnx", ov_build, options)
    publish(ov_build, repo, name="test_vit_openvino")


def tree_digest(root: Path) -> str:
    """Every path, file type, symlink target and file content under `root`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(b"->" + os.readlink(path).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(b"/")
    return digest.hexdigest()


# ── planning and the overlay, without a server ────────────────────────────────────────────────


def test_each_model_is_routed_by_its_published_config(repo):
    plan = plan_serving(repo, {"python"}, gpu_names=lambda: [])
    routes = {r.name: r for r in plan.routes}
    assert routes["test_vit"].served_by == PYTHON
    assert routes["test_vit"].describe() == ORT_LINE
    assert routes["test_vit_python"].served_by == NATIVE
    assert routes["test_vit_python"].describe() == "python → this server's python backend"
    trt = routes["test_vit_plan"]
    assert trt.served_by == NOT_SERVED
    assert "runs only on an NVIDIA GPU" in trt.reason and "this machine has none" in trt.reason
    assert "TensorRT 10.13.0" in trt.reason, trt.reason  # what the plan is locked to
    assert "mpdeploy build --backend onnxruntime --triton-repo R" in trt.remedy
    if HAS_OPENVINO:
        assert routes["test_vit_openvino"].describe() == OPENVINO_LINE
    assert plan.needs_overlay

    with_gpu = plan_serving(repo, {"python"}, gpu_names=lambda: ["NVIDIA H100"])
    assert "no tensorrt backend in this server" in with_gpu.route("test_vit_plan").reason

    # A Triton with the onnxruntime backend serves test_vit as it is published.
    full = plan_serving(repo, {"python", "onnxruntime", "openvino"}, gpu_names=lambda: [])
    assert full.route("test_vit").served_by == NATIVE


def test_backends_mpdeploy_cannot_run_get_a_reason_and_a_remedy(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    for name, selector in [
        ("torch_model", 'platform: "pytorch_libtorch"'),
        ("ov", 'backend: "openvino"'),
    ]:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n{selector}\n')
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda module, *a: None if module == "openvino" else real_find_spec(module, *a),
    )
    plan = plan_serving(repo, {"python"})
    torch_route, ov_route = plan.route("torch_model"), plan.route("ov")
    assert torch_route.served_by == NOT_SERVED == ov_route.served_by
    assert "mpdeploy cannot run pytorch_libtorch itself" in torch_route.reason
    assert "use a Triton that has the pytorch backend" in torch_route.remedy
    assert (
        ov_route.reason == "no openvino backend in this server, and openvino is not installed here"
    )
    assert ov_route.remedy.startswith("`pip install 'mpdeploy[openvino]'` and serve again")
    lines: list[str] = []
    with pytest.raises(UserError, match="no model in it can be served here"):
        serve(repo, echo=lines.append)
    assert len(lines) == 2 and all(": NOT SERVED — " in line for line in lines), lines
    assert any("To serve it, use a Triton that has the pytorch backend" in x for x in lines)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model folders in it; publish one with `mpdeploy build"):
        serve(tmp_path / "empty")


def test_overlay_keeps_name_versions_io_batching_and_labels(repo):
    before = tree_digest(repo)
    plan = plan_serving(repo, {"python"}, gpu_names=lambda: [])
    with overlay_repository(plan) as root:
        assert root.name.startswith(f"{OVERLAY_PREFIX}{os.getpid()}-")
        assert sorted(p.name for p in root.iterdir()) == sorted(
            ["broken", "test_vit", "test_vit_python"]
            + (["test_vit_openvino"] if HAS_OPENVINO else [])
        )
        # Mirrored file by file: the python stub's __pycache__ lands in the overlay, not in R.
        python_model = root / "test_vit_python" / "1" / "model.py"
        assert python_model.is_symlink()
        assert python_model.resolve() == (repo / "test_vit_python" / "1" / "model.py").resolve()
        published = read_config(repo / "test_vit" / "config.pbtxt")
        served = parse_config((root / "test_vit" / "config.pbtxt").read_text())
        assert (served.backend, served.platform) == ("python", "")
        for field in ("name", "max_batch_size", "input", "output", "version_policy",
                      "dynamic_batching", "model_warmup"):  # fmt: skip
            assert getattr(served, field) == getattr(published, field), field
        assert served.output[0].label_filename == "labels.txt"
        assert served.parameters["mpdeploy_runner"].string_value == "onnxruntime"
        assert served.parameters["mpdeploy_model_file"].string_value == "model.onnx"
        assert [g.kind for g in served.instance_group] == [g.kind for g in published.instance_group]
        model = root / "test_vit"
        assert (model / "labels.txt").resolve() == (repo / "test_vit" / "labels.txt").resolve()
        assert sorted(p.name for p in model.iterdir() if p.is_dir()) == ["1", "2"]
        for version in ("1", "2"):
            onnx = model / version / "model.onnx"
            assert onnx.is_symlink()
            assert onnx.resolve() == (repo / "test_vit" / version / "model.onnx").resolve()
            template = Path(__file__).parents[1] / "mpdeploy" / "serving" / "python_model.py"
            assert (model / version / "model.py").read_bytes() == template.read_bytes()
        if HAS_OPENVINO:  # the runner and its file come from the published `backend: "openvino"`
            ov_config = parse_config((root / "test_vit_openvino" / "config.pbtxt").read_text())
            parameters = {k: v.string_value for k, v in ov_config.parameters.items()}
            assert parameters["mpdeploy_runner"] == "openvino"
            assert parameters["mpdeploy_model_file"] == "model.xml"
            assert parameters["INFERENCE_PRECISION_HINT"] == "f32"  # the verified precision
            assert (root / "test_vit_openvino" / "1" / "model.bin").is_symlink()
    assert not root.exists()
    assert tree_digest(repo) == before


def test_overlay_of_a_killed_serve_is_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"{OVERLAY_PREFIX}{finished.stdout.strip()}-abc123"
    alive = tmp_path / f"{OVERLAY_PREFIX}{os.getpid()}-def456"
    other = tmp_path / "unrelated-1-x"
    for folder in (stale, alive, other):
        (folder / "model").mkdir(parents=True)
    remove_stale_overlays()
    assert not stale.exists() and alive.exists() and other.exists()


# ── the real server ────────────────────────────────────────────────────────────────────────────


def test_serve_serves_what_build_published_over_http_and_grpc(build, repo):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    before = tree_digest(repo)
    inputs, references, atol, rtol = parity_cases(build)
    http_port, grpc_port = free_ports(2)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mpdeploy.cli import main; sys.exit(main())",
         "serve", "--repo", str(repo), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    try:
        lines = _read_until(process, "Press Ctrl-C", READY_TIMEOUT_S + 30)
        text = "\n".join(lines)
        assert f"  test_vit v2: READY — {ORT_LINE}" in lines, text
        assert "  test_vit_python v1: READY — python → this server's python backend" in lines, text
        assert any(x.startswith("  test_vit_plan: NOT SERVED — tensorrt_plan → not servable here")
                   for x in lines), text  # fmt: skip
        assert any(
            x.startswith("  broken v-: NOT LOADED — config.pbtxt does not parse")
            and x.endswith(f"check it with `mpdeploy package --check {repo}`")
            for x in lines
        ), text
        overlay = Path(re.search(r"temporary overlay (\S+) ", text)[1])
        assert overlay.name.startswith(f"{OVERLAY_PREFIX}{process.pid}-") and overlay.is_dir()

        models = ["test_vit", "test_vit_python"]
        if HAS_OPENVINO:
            assert f"  test_vit_openvino v1: READY — {OPENVINO_LINE}" in lines, text
            models.append("test_vit_openvino")
        clients = [
            (httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", **HTTP_TIMEOUTS)),
            (grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")),
        ]  # fmt: skip
        try:
            http = clients[0][1]
            metadata = http.get_model_metadata("test_vit")
            assert metadata["versions"] == ["2"]
            assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
                ("input", "FP32", [-1, 3, 160, 160])
            ]
            assert http.get_model_config("test_vit")["max_batch_size"] == 4
            assert not http.is_model_ready("test_vit_plan")
            for model in models:
                for module, client in clients:
                    for batch, reference in zip(inputs, references, strict=True):
                        logits = infer(module, client, model, batch)
                        assert logits.dtype == np.float32 and logits.shape == reference.shape
                        np.testing.assert_allclose(logits, reference, atol=atol, rtol=rtol)
            labels = _top1_labels(httpclient, http, "test_vit", inputs[-1])
        finally:
            for _, client in clients:
                client.close()
        names = (repo / "test_vit" / "labels.txt").read_text().splitlines()
        assert labels == [names[i] for i in references[-1].argmax(axis=1)]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert not overlay.exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"mpdeploy-tritonserver-{process.pid}-*"))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", http_port)) != 0
    assert tree_digest(repo) == before


def _top1_labels(httpclient, client, model: str, batch: np.ndarray) -> list[str]:
    request = httpclient.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch)
    output = httpclient.InferRequestedOutput("logits", class_count=1)
    result = client.infer(model, [request], outputs=[output])
    return [row[0].decode().split(":", 2)[2] for row in result.as_numpy("logits")]


def test_strict_serves_only_what_the_server_itself_loads(build, tmp_path, capsys):
    from mpdeploy.cli import main

    repo = tmp_path / "repo"
    publish(build, repo)
    assert not plan_serving(repo, {"python", "onnxruntime"}).needs_overlay
    before = tree_digest(repo)
    http_port, grpc_port = free_ports(2)
    argv = ["serve", "--repo", str(repo), "--strict", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port)]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "test_vit v1: UNAVAILABLE" in captured.out and "unable to find backend" in captured.out
    assert f"— without --strict: {ORT_LINE}" in captured.out  # which option would serve it
    assert "overlay" not in captured.out
    assert (
        captured.err.strip()
        == f"mpdeploy: error: {repo}: no model is READY in the bundled Triton server"
    )
    assert tree_digest(repo) == before
