"""A bounded load test of the served python-backend model: HTTP and gRPC client threads, a fixed
number of requests, zero errors, every answer equal to the parity reference, a clean shutdown.
Throughput and latency are printed, not asserted (figures: scripts/serve_load.py, docs/serving.md).
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
from _helpers import free_ports
from _serving_build import verified_build

pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is missing")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

pytestmark = pytest.mark.serve


def test_bounded_load_over_http_and_grpc(tmp_path_factory, tmp_path):
    import subprocess
    import sys

    from test_serving_e2e import parity_cases

    from mpdeploy.serving import TritonServer, publish
    from mpdeploy.serving.load import run_load

    build = verified_build(tmp_path_factory.getbasetemp() / "serving")
    repo = tmp_path / "repo"
    name = publish(build, repo, python_backend=True).name
    inputs, references, atol, rtol = parity_cases(build)

    # What a SIGKILLed `mpdeploy serve` leaves behind: its server copy, owned by a dead pid.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = Path(tempfile.gettempdir()) / f"mpdeploy-tritonserver-{child.pid}-killed"
    (stale / "tritonserver").mkdir(parents=True)

    http_port, grpc_port = free_ports(2)
    with TritonServer(repo, http_port, grpc_port, ready_timeout=90) as server:
        assert not stale.exists(), "a killed server's copy must be removed by the next start"
        workdir = server._workdir
        report = run_load(
            server.http_url,
            server.grpc_url,
            name,
            inputs,
            references,
            threads={"http": 2, "grpc": 2},
            requests_per_thread=15,
            atol=atol,
            rtol=rtol,
        )
        process = server._process
    print(f"\nserve load: {report.to_dict()}")
    assert report.requests == 60 and report.errors == 0, report.first_error
    assert report.mismatches == 0, report.max_abs_diff
    # Clean shutdown: the server process is gone, its ports are free, its copy removed.
    assert process.poll() is not None
    assert not workdir.exists()
    for port in (http_port, grpc_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
