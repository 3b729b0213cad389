"""GPU speed of MP pruning vs 2:4 sparsity in PyTorch, against the fair baseline: the same model
dense in the same dtype (bf16), all timed in one process with CUDA graphs and CUDA events.

    python scripts/bench_gpu.py --out bench_gpu.json                   # all four models
    python scripts/bench_gpu.py --models vit_b16 --batches 128 --weights none --method magnitude

Variants per model: dense (bf16), MP-pruned to --target-macs (bf16, a smaller dense model),
dense with 2:4 semi-structured Linear weights (`torch.sparse.to_sparse_semi_structured`) and the
pruned model with 2:4 on top. Speedups are dense median latency / variant median latency at the
same batch size. Without a CUDA GPU it prints one line and exits 4. Untrained weights
(`--weights none`) are fine for speed, meaningless for accuracy; 2:4 masks are then magnitude
masks applied here, since only 2:4-patterned weights may be compressed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODELS = ("vit_b16", "vit_l16", "convnextv2_base", "resnet50")
BATCHES = (64, 128, 256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument(
        "--target-macs",
        type=float,
        default=0.5,
        help="Fraction of MACs the pruned variant removes.",
    )
    parser.add_argument("--method", choices=("mp", "magnitude"), default="mp")
    parser.add_argument("--weights", default="hub", help="hub, a checkpoint file, or none.")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument(
        "--force-cutlass",
        action="store_true",
        help="CUTLASS 2:4 kernels instead of cuSPARSELt (what the MP paper used).",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    from _prune_step import check_bench_args

    return check_bench_args(parser, parser.parse_args(argv))


def pruned_model(loaded, args):
    """The model with `args.target_macs` of its MACs removed by `prune_model`."""
    from _prune_step import prune_loaded

    result = prune_loaded(
        loaded,
        calib=args.calib,
        calib_size=args.calib_size,
        target_macs=args.target_macs,
        method=args.method,
    )
    return result.model, result.headline


def bench_model(name: str, args) -> dict:
    import torch

    from mpdeploy.backends.torch import TorchCudaRunner, prepare_model
    from mpdeploy.models import create_model
    from mpdeploy.prune.macs import count_macs
    from mpdeploy.verify.bench import (
        BatchTiming,
        TimedRunner,
        cuda_feed,
        measure_interleaved,
        random_feed,
    )

    loaded = create_model(name, args.weights)
    input_shape = tuple(loaded.data_config["input_size"])
    start = time.perf_counter()
    pruned, prune_headline = pruned_model(loaded, args)
    prune_seconds = time.perf_counter() - start
    macs = {
        "dense_macs": count_macs(loaded.model, (1, *input_shape)).total_macs,
        "pruned_macs": count_macs(pruned, (1, *input_shape)).total_macs,
    }
    sources = {
        "dense": (loaded.model, False),
        "pruned": (pruned, False),
        "dense_2of4": (loaded.model, True),
        "pruned_2of4": (pruned, True),
    }
    prepared, variants = {}, {}
    for variant, (model, sparse) in sources.items():
        try:
            prepared[variant], info = prepare_model(
                model,
                args.dtype,
                semi_structured=sparse,
                apply_mask=sparse,
                force_cutlass=args.force_cutlass,
            )
        except Exception as exc:  # a 2:4 kernel missing for this GPU is a result, not a crash
            variants[variant] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        variants[variant] = {"prepare": info}
    feed = cuda_feed(random_feed("input", input_shape))
    for batch in args.batches:  # one batch at a time: CUDA graphs of every size at once can OOM
        runners = {
            v: TimedRunner(
                TorchCudaRunner(
                    m, input_shape, name=v, dtype=args.dtype, cuda_graph=not args.no_cuda_graph
                ),
                feed,
                {"copy_outputs_to_host": False},
            )
            for v, m in prepared.items()
        }
        try:
            times = measure_interleaved(
                runners,
                (batch,),
                iterations=args.iterations,
                warmup=args.warmup,
                desc=f"{name} b{batch}",
            )
        except torch.cuda.OutOfMemoryError:
            for v in prepared:
                variants[v].setdefault("timings", {})[str(batch)] = {"error": "CUDA out of memory"}
            torch.cuda.empty_cache()
            continue
        for v, timed in runners.items():
            row = BatchTiming.from_seconds(batch, times[v][batch])
            variants[v].setdefault("timings", {})[str(batch)] = row.__dict__
            variants[v]["cuda_graph_error"] = timed.runner.graph_error
    _add_speedups(variants)
    return {
        "timm_name": loaded.spec.timm_name,
        "weights": loaded.weights_source,
        "input_shape": list(input_shape),
        **macs,
        "prune": {**prune_headline, "method": args.method, "seconds": round(prune_seconds, 1)},
        "variants": variants,
    }


def _add_speedups(variants: dict) -> None:
    dense = variants.get("dense", {}).get("timings", {})
    for info in variants.values():
        info["speedup_vs_dense"] = {
            batch: round(dense[batch]["median_ms"] / row["median_ms"], 4)
            for batch, row in info.get("timings", {}).items()
            if "median_ms" in row and "median_ms" in dense.get(batch, {})
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpdeploy.backends.torch import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        print(f"bench_gpu: needs a CUDA GPU: {reason}", file=sys.stderr)
        return 4
    import torch

    from mpdeploy.errors import UserError
    from mpdeploy.fileio import write_json
    from mpdeploy.verify.bench import machine_info

    torch.backends.cuda.matmul.allow_tf32 = False
    results = {
        "protocol": {
            "dtype": args.dtype,
            "batches": args.batches,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "cuda_graph": not args.no_cuda_graph,
            "timer": "CUDA events",
            "order": "interleaved per iteration, rotating which variant runs first",
            "force_cutlass": args.force_cutlass,
        },
        "machine": {**machine_info(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "models": {},
    }
    for name in args.models:
        try:
            results["models"][name] = bench_model(name, args)
        except UserError as exc:
            results["models"][name] = {"error": str(exc)}
            print(f"bench_gpu: {name}: {exc}", file=sys.stderr)
        write_json(args.out, results)  # after every model, so a late failure keeps the rest
    print(f"bench_gpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
