"""ONNX Runtime CPU latency of dense vs structurally pruned models at a MAC-reduction target.

    python scripts/bench_prune_cpu.py                       # vit_small_patch16_224 + resnet50, 50 %
    python scripts/bench_prune_cpu.py --models resnet50 --runs 40 --method magnitude

Random weights (no downloads). Each model is pruned with `prune_model`, both graphs are exported
with `export_onnx`, and the two ONNX Runtime sessions are timed in one process, alternating dense
and pruned run by run, after warm-up. Writes JSON and the results block of docs/pruning.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from prune_eval import replace_block  # noqa: E402

MARKER = "bench-cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "resnet50"])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--method", default="random", choices=["magnitude", "random"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument(
        "--runs", type=int, default=25, help="timed runs per model and batch (≥ 20)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--out-json", type=Path, default=REPO_ROOT / "docs" / "pruning-bench-cpu.json"
    )
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "pruning.md")
    parser.add_argument("--marker", default=MARKER, help="results block of --doc to replace")
    return parser.parse_args(argv)


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from mpdeploy.backends.onnxruntime import make_session
    from mpdeploy.export import INPUT_NAME, export_onnx
    from mpdeploy.models import create_model
    from mpdeploy.prune import PruneConfig, prune_model

    loaded = create_model(name, weights="none")
    shape = tuple(loaded.data_config["input_size"])
    # no calibration images here (speed only), so no closed-form compensation either
    config = PruneConfig(args.target, method=args.method, compensate="none")
    result = prune_model(loaded.model, None, None, config, input_shape=shape)
    paths = {"dense": workdir / f"{name}-dense.onnx", "pruned": workdir / f"{name}-pruned.onnx"}
    export_onnx(loaded.model, paths["dense"], shape)
    export_onnx(result.model, paths["pruned"], shape)
    sessions = {k: make_session(p, threads=args.threads) for k, p in paths.items()}
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        with torch.no_grad():
            ref = result.model(torch.from_numpy(x)).numpy()
        got = sessions["pruned"].run(None, {INPUT_NAME: x})[0]
        parity = float(np.abs(got - ref).max())
        for _ in range(args.warmup):
            for session in sessions.values():
                session.run(None, {INPUT_NAME: x})
        times: dict[str, list[float]] = {"dense": [], "pruned": []}
        for _ in range(args.runs):
            for key in ("dense", "pruned"):  # alternate so load drifts hit both alike
                start = time.perf_counter()
                sessions[key].run(None, {INPUT_NAME: x})
                times[key].append(time.perf_counter() - start)
        dense_ms = 1e3 * float(np.median(times["dense"]))
        pruned_ms = 1e3 * float(np.median(times["pruned"]))
        mac_ratio = result.headline["dense_macs"] / result.headline["pruned_macs"]
        speedup = dense_ms / pruned_ms
        rows.append(
            {
                "model": name,
                "batch": batch,
                "dense_ms": dense_ms,
                "pruned_ms": pruned_ms,
                "dense_p90_ms": 1e3 * float(np.percentile(times["dense"], 90)),
                "pruned_p90_ms": 1e3 * float(np.percentile(times["pruned"], 90)),
                "speedup": speedup,
                "mac_ratio": mac_ratio,
                "speedup_over_mac_ratio": speedup / mac_ratio,
                "meets_target": speedup >= 0.85 * mac_ratio,
                "pruned_parity_max_abs": parity,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "model": name,
        "headline": result.headline,
        "plan_totals": result.plan["totals"],
        "rows": rows,
    }


def environment() -> dict:
    import onnx
    import onnxruntime
    import timm
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [
        f"Measured {env['date']} on a {env['cpu_count']}-core {env['machine']} CPU "
        f"(load average at start {', '.join(f'{v:.1f}' for v in env['load_average_at_start'])}); "
        f"torch {env['torch']}, timm {env['timm']}, onnx {env['onnx']}, onnxruntime "
        f"{env['onnxruntime']}. Method `{payload['method']}`, target {payload['target']:.0%}, "
        f"ONNX Runtime CPU with {payload['threads']} intra-op threads, median of "
        f"{payload['runs']} alternating runs after {payload['warmup']} warm-up runs.",
        "",
        "| model | batch | MAC reduction | dense ms | pruned ms | speed-up | MAC ratio | speed-up / MAC ratio | ≥ 0.85 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in payload["models"]:
        reduction = model["headline"]["mac_reduction"]
        for row in model["rows"]:
            lines.append(
                f"| {row['model']} | {row['batch']} | {reduction:.1%} | {row['dense_ms']:.1f} | "
                f"{row['pruned_ms']:.1f} | {row['speedup']:.2f}× | {row['mac_ratio']:.2f}× | "
                f"{row['speedup_over_mac_ratio']:.2f} | {'yes' if row['meets_target'] else 'no'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runs < 20:
        raise SystemExit("--runs must be at least 20")
    import torch

    torch.set_num_threads(args.threads)
    env = environment()
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        models = [bench_model(name, args, Path(tmp)) for name in args.models]
    payload = {
        "environment": env,
        "method": args.method,
        "target": args.target,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "command": " ".join(["python", "scripts/bench_prune_cpu.py", *(argv or sys.argv[1:])]),
        "models": models,
    }
    args.out_json.write_text(json.dumps(payload, indent=2) + "\n")
    replace_block(args.doc, args.marker, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
