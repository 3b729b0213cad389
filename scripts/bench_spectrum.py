"""Time the analyze stage (MP fit of every Linear/Conv2d weight) on ViT-B/16 and ViT-L/16.

Weights are random (timm pretrained=False): the fit's cost depends on shapes, not values.
OpenMP threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE, set before
torch loads): on a shared, oversubscribed CPU, spinning made 2 threads 8× slower than 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402

import mpdeploy.models  # noqa: E402,F401  (makes timm importable)
from mpdeploy.fileio import write_json  # noqa: E402
from mpdeploy.mp import tw1_quantile  # noqa: E402
from mpdeploy.spectrum import analyze_model, target_layers  # noqa: E402

TARGETS_S = {"vit_base_patch16_224": 2.0, "vit_large_patch16_224": 8.0}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_model(name: str, runs: int, threads: int) -> dict:
    import timm

    torch.set_num_threads(threads)
    model = timm.create_model(name, pretrained=False).eval()
    layers = target_layers(model)
    times, cpu = [], []
    load_before = os.getloadavg()[0]
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        analyze_model(model)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = statistics.median(times)
    return {
        "model": name,
        "torch_threads": threads,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "matrices": len(layers),
        "gram_sizes": sorted(
            {min(m.weight.shape[0], m.weight[0].numel()) for m in layers.values()}
        ),
        "runs_s": [round(t, 4) for t in times],
        "median_s": round(median, 4),
        # CPU seconds used: close to the wall time on an idle machine when threads == 1.
        "cpu_s": [round(t, 4) for t in cpu],
        "median_cpu_s": round(statistics.median(cpu), 4),
        "target_s": TARGETS_S.get(name),
        "meets_target": median < TARGETS_S[name] if name in TARGETS_S else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results/spectrum.json"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--models", nargs="+", default=list(TARGETS_S))
    args = parser.parse_args()
    tw1_quantile(0.2), tw1_quantile(0.95)  # one-off cost (~0.1 s, cached), not per model
    results = [bench_model(m, args.runs, t) for t in args.threads for m in args.models]
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "timm": __import__("timm").__version__,
        },
        "results": results,
    }
    write_json(args.out, payload)
    for r in results:
        print(
            f"{r['model']} ({r['torch_threads']} threads, load {r['load_average_1m']}): "
            f"{r['matrices']} matrices, median {r['median_s']:.3f} s {r['runs_s']}, "
            f"CPU {r['median_cpu_s']:.3f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
