"""Bounded load on `mpdeploy serve`'s server: HTTP and gRPC client threads against the
python-backend variant of a verified build, every answer checked against the parity reference.

    mpdeploy build --out engines/demo                     # the bundled demo model
    python scripts/serve_load.py --build engines/demo --threads 4 --requests 100 --out load.json

Prints (and with --out writes) the LoadReport — requests, errors, mismatches, throughput,
p50/p99 latency — with the machine: CPU model, cores and the load average while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", required=True, type=Path, help="A verified build directory.")
    parser.add_argument("--threads", type=int, default=4, help="Client threads per protocol.")
    parser.add_argument("--requests", type=int, default=100, help="Requests per thread.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.requests < 1:
        parser.error("--threads and --requests must be at least 1")
    return args


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": model, "cores": os.cpu_count(), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from mpdeploy.serving import TritonServer, publish
    from mpdeploy.serving.load import run_load

    args = parse_args(argv)
    feeds = load_json(str(args.build / "parity" / "inputs.json"))
    ((_, iterations),) = RunResults.load(str(args.build / "parity" / "reference.json")).items()
    report_json = json.loads((args.build / "parity" / "report.json").read_text())
    tolerances = report_json.get("tolerances", report_json)
    inputs = [np.asarray(feed["input"]) for feed in feeds]
    references = [np.asarray(iteration["logits"]) for iteration in iterations]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        published = publish(args.build, Path(tmp) / "repo", python_backend=True)
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        before = machine()
        with TritonServer(published.model_dir.parent, *ports, ready_timeout=120) as server:
            report = run_load(
                server.http_url,
                server.grpc_url,
                published.name,
                inputs,
                references,
                threads={"http": args.threads, "grpc": args.threads},
                requests_per_thread=args.requests,
                atol=float(tolerances["atol"]),
                rtol=float(tolerances["rtol"]),
            )
    result = {
        "build": str(args.build),
        "model": published.name,
        "batch_sizes": sorted({int(x.shape[0]) for x in inputs}),
        "machine_before": before,
        "machine_after": machine(),
        **report.to_dict(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report.errors == 0 and report.mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
