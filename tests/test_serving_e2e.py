"""A published build served by the real Triton server bundled in nvidia-pytriton.

The python-backend variant is loaded and answered over HTTP and gRPC; the parity inputs must
reproduce the PyTorch reference within the tolerances of the parity report. The onnxruntime_onnx
variant must pass the server's own config parsing; its only allowed complaint is the backend that
the bundle lacks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import free_ports
from _serving_build import verified_build

from mpdeploy.errors import UserError
from mpdeploy.serving import TritonServer, check_repository, publish

pytest.importorskip(
    "pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed"
)
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

pytestmark = pytest.mark.serve

READY_TIMEOUT_S = 60
CLIENT_TIMEOUT_S = 30
HTTP_TIMEOUTS = {"connection_timeout": CLIENT_TIMEOUT_S, "network_timeout": CLIENT_TIMEOUT_S}


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Path:
    return verified_build(tmp_path_factory.getbasetemp() / "serving")


@pytest.fixture(scope="module")
def repo(build, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    publish(build, repo, python_backend=True)
    publish(build, repo)
    assert check_repository(repo) == []
    return repo


def parity_cases(build: Path) -> tuple[list[np.ndarray], list[np.ndarray], float, float]:
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    feeds = load_json(str(build / "parity" / "inputs.json"))
    ((_, iterations),) = RunResults.load(str(build / "parity" / "reference.json")).items()
    report = json.loads((build / "parity" / "report.json").read_text())
    tolerances = report.get("tolerances", report)
    inputs = [np.asarray(feed["input"]) for feed in feeds]
    references = [np.asarray(iteration["logits"]) for iteration in iterations]
    return inputs, references, float(tolerances["atol"]), float(tolerances["rtol"])


def infer(client_module, client, model: str, batch: np.ndarray) -> np.ndarray:
    request = client_module.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch)
    output = client_module.InferRequestedOutput("logits")
    # gRPC bounds each call; the HTTP client was given its network timeout when it was made.
    bound = {"client_timeout": CLIENT_TIMEOUT_S} if client_module.__name__.endswith("grpc") else {}
    result = client.infer(model, [request], outputs=[output], **bound)
    return result.as_numpy("logits")


def test_served_model_reproduces_the_parity_reference(build, repo):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    inputs, references, atol, rtol = parity_cases(build)
    http_port, grpc_port = free_ports(2)
    with TritonServer(
        repo, http_port, grpc_port, ready_timeout=READY_TIMEOUT_S, strict=False
    ) as server:
        states = {m.name: m for m in server.model_states()}
        assert states["test_vit_python"].state == "READY"
        # The bundle has no onnxruntime backend; any other complaint is a config error.
        onnx_model = states["test_vit"]
        assert onnx_model.state == "UNAVAILABLE"
        assert "unable to find backend library" in onnx_model.reason, onnx_model.reason
        assert "text proto" not in server.logs()

        worst = 0.0
        clients = [
            (httpclient, httpclient.InferenceServerClient(server.http_url, **HTTP_TIMEOUTS)),
            (grpcclient, grpcclient.InferenceServerClient(server.grpc_url)),
        ]
        try:
            for module, client in clients:
                assert client.is_model_ready("test_vit_python")
                for batch, reference in zip(inputs, references, strict=True):
                    logits = infer(module, client, "test_vit_python", batch)
                    assert logits.dtype == np.float32 and logits.shape == reference.shape
                    np.testing.assert_allclose(logits, reference, atol=atol, rtol=rtol)
                    worst = max(worst, float(np.abs(logits - reference).max()))
            labels = _top1_labels(httpclient, clients[0][1], inputs[-1])
        finally:
            for _, client in clients:
                client.close()
        names = (repo / "test_vit_python" / "labels.txt").read_text().splitlines()
        assert labels == [names[i] for i in references[-1].argmax(axis=1)]
    print(f"\ntritonserver ready in {server.startup_s:.2f} s; max |Triton - torch| = {worst:.3g}")


def _top1_labels(httpclient, client, batch: np.ndarray) -> list[str]:
    """Triton's classification extension reads labels.txt: `score:index:label` per row."""
    request = httpclient.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch)
    output = httpclient.InferRequestedOutput("logits", class_count=1)
    result = client.infer("test_vit_python", [request], outputs=[output])
    return [row[0].decode().split(":", 2)[2] for row in result.as_numpy("logits")]


def test_dynamic_batching_answers_each_request(build, repo):
    """Concurrent single-image requests, batched by Triton, each get their own row back."""
    import tritonclient.http as httpclient

    inputs, references, atol, rtol = parity_cases(build)
    rows, expected = inputs[-1], references[-1]
    http_port, grpc_port = free_ports(2)
    with TritonServer(repo, http_port, grpc_port, ready_timeout=READY_TIMEOUT_S, strict=False) as s:
        client = httpclient.InferenceServerClient(
            s.http_url, concurrency=len(rows), **HTTP_TIMEOUTS
        )
        try:
            pending = []
            for row in rows:
                request = httpclient.InferInput("input", [1, *row.shape], "FP32")
                request.set_data_from_numpy(row[None])
                pending.append(client.async_infer("test_vit_python", [request]))
            results = [p.get_result(timeout=CLIENT_TIMEOUT_S) for p in pending]
        finally:
            client.close()
    for result, reference in zip(results, expected, strict=True):
        np.testing.assert_allclose(result.as_numpy("logits")[0], reference, atol=atol, rtol=rtol)


def test_malformed_config_stops_the_strict_server(build, tmp_path):
    repo = tmp_path / "repo"
    published = publish(build, repo, python_backend=True)
    published.config_path.write_text(published.config_path.read_text() + "instance_group {")
    started = time.monotonic()
    server = TritonServer(repo, *free_ports(2), ready_timeout=READY_TIMEOUT_S)
    with pytest.raises(UserError, match=r"tritonserver exited.*failed to read text proto"):
        server.start()
    assert time.monotonic() - started < READY_TIMEOUT_S


def test_serve_stops_cleanly_on_sigterm(repo):
    http_port, grpc_port = free_ports(2)
    code = (
        "import sys; from mpdeploy.serving import serve; "
        f"serve(sys.argv[1], {http_port}, {grpc_port}, ready_timeout={READY_TIMEOUT_S})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1])])}
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(repo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = _read_until(process, "Press Ctrl-C", READY_TIMEOUT_S + 10)
        assert any(f"http://127.0.0.1:{http_port}" in line for line in lines), lines
        assert any(f"127.0.0.1:{grpc_port}" in line for line in lines), lines
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    with socket.socket() as probe:  # the server went with it: its port is free again
        assert probe.connect_ex(("127.0.0.1", http_port)) != 0


def _read_until(process: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """Lines of the process's output up to the one holding `marker`, read with a bounded wait."""
    import queue
    import threading

    received: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            received.put(line.rstrip())
        received.put(None)

    threading.Thread(target=pump, daemon=True).start()
    lines, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = received.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout} s: {lines}")
