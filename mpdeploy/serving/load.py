"""A bounded load test of a served model: client threads over HTTP and gRPC, a fixed number of
requests each, every answer compared with a reference; latency percentiles and throughput."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import numpy as np

CLIENT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class LoadReport:
    protocol_threads: dict[str, int]
    requests: int
    errors: int
    mismatches: int
    max_abs_diff: float
    seconds: float
    throughput_rps: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    first_error: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_load(
    http_url: str,
    grpc_url: str,
    model: str,
    inputs: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    threads: dict[str, int] | None = None,
    requests_per_thread: int = 25,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    input_name: str = "input",
    output_name: str = "logits",
) -> LoadReport:
    """Every thread sends `requests_per_thread` requests, cycling through `inputs`."""
    threads = threads or {"http": 2, "grpc": 2}
    latencies: list[float] = []
    failures: list[str] = []
    counts = {"mismatches": 0, "images": 0}
    worst = [0.0]
    lock = threading.Lock()
    start_gate = threading.Barrier(sum(threads.values()) + 1)

    def client_loop(protocol: str, offset: int) -> None:
        client, module = _client(protocol, http_url, grpc_url)
        try:
            start_gate.wait()
            for i in range(requests_per_thread):
                k = (offset + i) % len(inputs)
                began = time.perf_counter()
                try:
                    out = _infer(
                        module, client, protocol, model, inputs[k], input_name, output_name
                    )
                except Exception as exc:  # counted: the test asserts there are none
                    with lock:
                        failures.append(f"{protocol}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - began
                diff = (
                    float(np.abs(out - references[k]).max())
                    if out.shape == references[k].shape
                    else float("inf")
                )
                ok = (
                    np.allclose(out, references[k], atol=atol, rtol=rtol)
                    if np.isfinite(diff)
                    else False
                )
                with lock:
                    latencies.append(elapsed)
                    counts["images"] += int(inputs[k].shape[0])
                    worst[0] = max(worst[0], diff)
                    counts["mismatches"] += 0 if ok else 1
        finally:
            client.close()

    workers = [
        threading.Thread(target=client_loop, args=(protocol, n), daemon=True)
        for protocol, count in threads.items()
        for n in range(count)
    ]
    for worker in workers:
        worker.start()
    start_gate.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join(timeout=CLIENT_TIMEOUT_S * requests_per_thread)
    seconds = time.perf_counter() - began
    done = np.asarray(latencies) * 1000.0
    return LoadReport(
        protocol_threads=dict(threads),
        requests=len(latencies) + len(failures),
        errors=len(failures),
        mismatches=counts["mismatches"],
        max_abs_diff=worst[0],
        seconds=round(seconds, 3),
        throughput_rps=round(len(latencies) / seconds, 1) if seconds else 0.0,
        images_per_s=round(counts["images"] / seconds, 1) if seconds else 0.0,
        p50_ms=round(float(np.percentile(done, 50)), 2) if len(done) else float("nan"),
        p99_ms=round(float(np.percentile(done, 99)), 2) if len(done) else float("nan"),
        first_error=failures[0] if failures else None,
    )


def _client(protocol: str, http_url: str, grpc_url: str):
    if protocol == "http":
        import tritonclient.http as module

        timeouts = {"connection_timeout": CLIENT_TIMEOUT_S, "network_timeout": CLIENT_TIMEOUT_S}
        return module.InferenceServerClient(http_url, **timeouts), module
    import tritonclient.grpc as module

    return module.InferenceServerClient(grpc_url), module


def _infer(module, client, protocol, model, batch, input_name, output_name) -> np.ndarray:
    request = module.InferInput(input_name, list(batch.shape), "FP32")
    request.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    output = module.InferRequestedOutput(output_name)
    bound = {"client_timeout": CLIENT_TIMEOUT_S} if protocol == "grpc" else {}
    result = client.infer(model, [request], outputs=[output], **bound)
    return result.as_numpy(output_name)
