"""CPU backends side by side: ONNX Runtime fp32 vs OpenVINO fp32 vs OpenVINO bf16, dense and
MP-pruned, all interleaved in one process through the runners `mpdeploy verify` uses.

    python scripts/bench_openvino.py --out bench_openvino.json
    python scripts/bench_openvino.py --models resnet50 --batches 1 8 --iterations 5 --threads 2

For each model: the dense model and the model pruned to --target-macs of its MACs removed are
exported once; each ONNX is built by the onnxruntime backend (fp32) and the openvino backend
(fp32, and bf16 where this CPU has native bf16 — otherwise the refusal line is recorded); every
variant is timed with the protocol of `mpdeploy.verify.bench` (warm-up, then iterations that
rotate which variant runs first). Speedups are dense ONNX Runtime fp32 median / variant median,
with a 95 % bootstrap interval over the interleaved iterations; bf16 top-1 agreement with ONNX
Runtime fp32 is measured on the calibration images. Untrained weights (`--weights none`, the
default: no hub offline) are fine for timing and meaningless for accuracy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
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
    parser.add_argument("--calib-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="Threads for both runtimes.")
    parser.add_argument("--out", type=Path, default=Path("bench_openvino.json"))
    from _prune_step import check_bench_args

    return check_bench_args(parser, parser.parse_args(argv))


def lscpu() -> dict[str, str]:
    """`lscpu`'s model name and flags, as recorded beside every CPU figure."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in fields.items() if k.strip() in ("Model name", "Flags")}


def build_variants(name: str, args, workdir: Path):
    """Export dense and pruned, build every backend/precision; runners, records and refusals."""
    from _prune_step import prune_loaded

    from mpdeploy.backends import EngineOptions, get_backend
    from mpdeploy.errors import UserError
    from mpdeploy.export import export_onnx
    from mpdeploy.models import create_model
    from mpdeploy.prune.macs import count_macs

    loaded = create_model(name, args.weights)
    input_shape = tuple(int(v) for v in loaded.data_config["input_size"])
    result = prune_loaded(
        loaded,
        calib=args.calib,
        calib_size=args.calib_size,
        target_macs=args.target_macs,
        method=args.method,
    )
    macs = {
        "dense_macs": count_macs(loaded.model, (1, *input_shape)).total_macs,
        "pruned_macs": count_macs(result.model, (1, *input_shape)).total_macs,
    }
    runners, refused = {}, {}
    combos = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))
    for variant, model in (("dense", loaded.model), ("pruned", result.model)):
        folder = workdir / name / variant
        folder.mkdir(parents=True)
        export_onnx(model, folder / "model.onnx", input_shape)
        for backend_name, precision in combos:
            key = f"{variant} {backend_name} {precision}"
            options = EngineOptions(
                precision=precision, max_batch=max(args.batches), threads=args.threads
            )
            backend = get_backend(backend_name, require_available=False)
            try:
                backend.check(options)
                # records stay in memory: the backends may share `folder` (one model.onnx)
                record = backend.build(folder / "model.onnx", folder, options)
            except UserError as exc:
                refused[key] = str(exc)
                continue
            runners[key] = backend.runner(record, folder, name=key)
    return loaded, result, input_shape, macs, runners, refused


def top1_agreement(runners, images) -> dict[str, float]:
    """Top-1 agreement of every bf16 variant with ONNX Runtime fp32 of the same model."""
    import numpy as np

    feed = {"input": images.numpy().astype(np.float32)}
    agreement = {}
    for key, runner in runners.items():
        if not key.endswith("bf16"):
            continue
        base = key.replace("openvino bf16", "onnxruntime fp32")
        with runner, runners[base]:
            got = runner.infer(feed)["logits"].argmax(1)
            ref = runners[base].infer(feed)["logits"].argmax(1)
        agreement[key] = float((got == ref).mean())
    return agreement


def bench_model(name: str, args, workdir: Path) -> dict:
    from mpdeploy.verify.bench import (
        BatchTiming,
        TimedRunner,
        measure_interleaved,
        random_feed,
        speedup_ci,
    )

    start = time.perf_counter()
    loaded, result, input_shape, macs, runners, refused = build_variants(name, args, workdir)
    build_seconds = time.perf_counter() - start
    feed = random_feed("input", input_shape)
    batches = tuple(sorted(set(args.batches)))
    load_before = os.getloadavg()
    times = measure_interleaved(
        {k: TimedRunner(r, feed) for k, r in runners.items()},
        batches,
        iterations=args.iterations,
        warmup=args.warmup,
        desc=name,
    )
    load_after = os.getloadavg()
    baseline = "dense onnxruntime fp32"
    rows, speedups = {}, {}
    for key in runners:
        rows[key] = {str(b): BatchTiming.from_seconds(b, times[key][b]).__dict__ for b in batches}
        speedups[key] = {}
        for b in batches:
            point, low, high = speedup_ci(times[baseline][b], times[key][b])
            speedups[key][str(b)] = [round(point, 4), round(low, 4), round(high, 4)]
    return {
        "timm_name": loaded.spec.timm_name,
        "weights": loaded.weights_source,
        "input_shape": list(input_shape),
        **macs,
        "mac_ratio": round(macs["dense_macs"] / macs["pruned_macs"], 4),
        "prune": {**result.headline, "method": args.method},
        "build_seconds": round(build_seconds, 1),
        "timings": rows,
        "speedup_vs_dense_ort_fp32": speedups,
        "refused": refused,
        "bf16_top1_agreement_with_ort_fp32": top1_agreement(runners, _images(loaded, args)),
        "load_average": {
            "before": [round(v, 2) for v in load_before],
            "after": [round(v, 2) for v in load_after],
        },
    }


def _images(loaded, args):
    from mpdeploy.data.calibration import load_calibration

    return load_calibration(
        args.calib, args.calib_size, loaded.data_config, model_name=loaded.spec.timm_name
    ).images


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpdeploy import hardware
    from mpdeploy.errors import UserError
    from mpdeploy.fileio import write_json
    from mpdeploy.verify.bench import machine_info

    results = {
        "protocol": {
            "variants": "dense/pruned × onnxruntime fp32, openvino fp32, openvino bf16",
            "batches": args.batches,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "threads": args.threads,
            "target_macs": args.target_macs,
            "timer": "Polygraphy runner.last_inference_time() (OnnxrtRunner, OpenVinoRunner)",
            "order": "all variants interleaved per iteration, rotating which runs first",
            "interval": "95 % bootstrap over iterations of dense ORT fp32 / variant medians",
        },
        "machine": {**machine_info(), "lscpu": lscpu(), "hardware": hardware.summary()},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="mpdeploy-bench-openvino-") as tmp:
        for name in args.models:
            try:
                results["models"][name] = bench_model(name, args, Path(tmp))
            except UserError as exc:
                results["models"][name] = {"error": str(exc)}
                print(f"bench_openvino: {name}: {exc}", file=sys.stderr)
            write_json(args.out, results)
    for name, row in results["models"].items():
        for key, by_batch in row.get("speedup_vs_dense_ort_fp32", {}).items():
            shown = ", ".join(
                f"b{b}: {s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]" for b, s in by_batch.items()
            )
            print(f"{name} {key}: {shown}")
        for key, reason in row.get("refused", {}).items():
            print(f"{name} {key}: refused: {reason}")
    print(f"bench_openvino: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
