"""ONNX Runtime CPU speed of dense vs MP-pruned models, measured in one process, interleaved.

    python scripts/bench_cpu.py --out bench_cpu.json
    python scripts/bench_cpu.py --models resnet50 --batches 1 8 --weights none --method magnitude

For each model: export the dense model and the model pruned to --target-macs of its MACs removed,
build both with the onnxruntime backend (same threads, same options), and time them through the
same Polygraphy runners with the protocol of `mpdeploy.verify.bench` (warm-up, then iterations
that alternate dense and pruned). Untrained weights (`--weights none`, the default here: the hub
is not reachable offline) are fine for timing and meaningless for accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("vit_b16", "resnet50", "convnextv2_base")
BATCHES = (1, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--method", choices=("mp", "magnitude", "random"), default="mp")
    parser.add_argument("--weights", default="none", help="hub, a checkpoint file, or none.")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads [default: ONNX Runtime's choice].",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_cpu.json"))
    from _prune_step import check_bench_args

    return check_bench_args(parser, parser.parse_args(argv))


def bench_model(name: str, args, workdir: Path) -> dict:
    from _prune_step import prune_loaded

    from mpdeploy.backends import EngineOptions, get_backend
    from mpdeploy.export import export_onnx
    from mpdeploy.models import create_model
    from mpdeploy.prune.macs import count_macs
    from mpdeploy.verify.bench import BatchTiming, TimedRunner, measure_interleaved, random_feed

    loaded = create_model(name, args.weights)
    input_shape = tuple(int(v) for v in loaded.data_config["input_size"])
    start = time.perf_counter()
    result = prune_loaded(
        loaded,
        calib=args.calib,
        calib_size=args.calib_size,
        target_macs=args.target_macs,
        method=args.method,
    )
    prune_seconds = time.perf_counter() - start
    dense_macs = count_macs(loaded.model, (1, *input_shape)).total_macs
    pruned_macs = count_macs(result.model, (1, *input_shape)).total_macs
    backend = get_backend("onnxruntime")
    options = EngineOptions(max_batch=max(args.batches), threads=args.threads)
    runners, records = {}, {}
    for variant, model in (("dense", loaded.model), ("pruned", result.model)):
        folder = workdir / name / variant
        folder.mkdir(parents=True)
        export_onnx(model, folder / "model.onnx", input_shape)
        records[variant] = backend.build(folder / "model.onnx", folder, options)
        runners[variant] = TimedRunner(
            backend.runner(records[variant], folder, name=variant),
            random_feed("input", input_shape),
        )
    batches = tuple(sorted(set(args.batches)))
    load_before = os.getloadavg()[0]
    times = measure_interleaved(
        runners, batches, iterations=args.iterations, warmup=args.warmup, desc=name
    )
    rows = {
        v: {str(b): BatchTiming.from_seconds(b, times[v][b]).__dict__ for b in batches}
        for v in runners
    }
    return {
        "timm_name": loaded.spec.timm_name,
        "weights": loaded.weights_source,
        "input_shape": list(input_shape),
        "dense_macs": dense_macs,
        "pruned_macs": pruned_macs,
        "mac_ratio": round(dense_macs / pruned_macs, 4),
        "prune": {**result.headline, "method": args.method, "seconds": round(prune_seconds, 1)},
        "onnx_bytes": {v: r.size_bytes for v, r in records.items()},
        "timings": rows,
        "speedup": {
            b: round(rows["dense"][b]["median_ms"] / rows["pruned"][b]["median_ms"], 4)
            for b in rows["dense"]
        },
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpdeploy.errors import UserError
    from mpdeploy.fileio import write_json
    from mpdeploy.verify.bench import machine_info

    results = {
        "protocol": {
            "backend": "onnxruntime CPUExecutionProvider",
            "batches": args.batches,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "threads": args.threads,
            "target_macs": args.target_macs,
            "timer": "Polygraphy OnnxrtRunner.last_inference_time()",
            "order": "interleaved per iteration, alternating which model runs first",
        },
        "machine": machine_info(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="mpdeploy-bench-cpu-") as tmp:
        for name in args.models:
            try:
                results["models"][name] = bench_model(name, args, Path(tmp))
            except UserError as exc:
                results["models"][name] = {"error": str(exc)}
                print(f"bench_cpu: {name}: {exc}", file=sys.stderr)
            write_json(args.out, results)
    for name, row in results["models"].items():
        if "speedup" in row:
            print(
                f"{name}: MAC ratio {row['mac_ratio']:.2f}x, speedup "
                + ", ".join(f"batch {b}: {s:.2f}x" for b, s in row["speedup"].items())
            )
    print(f"bench_cpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
