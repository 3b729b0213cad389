"""ONNX Runtime CPU latency of dense vs structurally pruned models at a MAC-reduction target.

    python scripts/bench_prune_cpu.py                       # vit_small_patch16_224 + resnet50, 50 %
    python scripts/bench_prune_cpu.py --models resnet50 --runs 40 --method magnitude
    python scripts/bench_prune_cpu.py --prune-stage vit_b16 --calib-size 256   # the prune stage

`--prune-stage MODEL` times instead the prune stage of `mpdeploy build --model MODEL --weights none`
(calibration images, MP spectrum, scores, plan, compensation, headline) with `--calib-size` builtin
images: wall and CPU time (process_time: all threads) per phase, and the passes of images through
the dense and the pruned network, counted with a global forward hook. Writes --out-json only.

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
        "--out-json",
        type=Path,
        default=None,
        help="default docs/pruning-bench-cpu.json (--prune-stage: docs/prune-stage-cpu.json)",
    )
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "pruning.md")
    parser.add_argument("--marker", default=MARKER, help="results block of --doc to replace")
    parser.add_argument("--prune-stage", metavar="MODEL", help="time the prune stage of MODEL")
    parser.add_argument("--calib-size", type=int, default=256, help="with --prune-stage")
    parser.add_argument(
        "--criterion", default=None, help="with --prune-stage (default: PruneConfig's)"
    )
    args = parser.parse_args(argv)
    if args.out_json is None:
        name = "prune-stage-cpu.json" if args.prune_stage else "pruning-bench-cpu.json"
        args.out_json = REPO_ROOT / "docs" / name
    return args


class PassCounter:
    """Images through the dense and the pruned network (root-module forwards; the planner's
    batch-1 MAC counts apart), split by whether autograd recorded them, and the images of every
    backward pass through the dense logits (`mp_fisher_taylor` runs two per forward)."""

    def __init__(self, dense, calib_shape):
        self.dense, self.shape = dense, tuple(calib_shape[1:])
        self.images = {
            "dense": 0,
            "dense_with_grad": 0,
            "dense_backward": 0,
            "pruned": 0,
            "mac_count_forwards": 0,
        }

    def __call__(self, module, inputs, output):
        import torch

        x = inputs[0] if inputs else None
        if type(module) is not type(self.dense) or not torch.is_tensor(x):
            return
        if tuple(x.shape[1:]) != self.shape or (x.shape[0] == 1 and not x.any()):
            self.images["mac_count_forwards"] += 1
        elif module is not self.dense:
            self.images["pruned"] += x.shape[0]
        elif torch.is_grad_enabled() and getattr(output, "requires_grad", False):
            self.images["dense_with_grad"] += x.shape[0]
            output.register_hook(lambda grad: self._backward(grad.shape[0]))
        else:
            self.images["dense"] += x.shape[0]

    def _backward(self, images: int) -> None:
        self.images["dense_backward"] += images


def prune_stage(args: argparse.Namespace) -> dict:
    """Time calibrate → analyze → prune as `mpdeploy build` runs them, phase by phase."""
    import torch

    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.models import create_model
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.spectrum import analyze_model

    loaded = create_model(args.prune_stage, weights="none")
    shape = tuple(int(v) for v in loaded.data_config["input_size"])
    config = PruneConfig(args.target)
    if args.criterion:
        config = PruneConfig(args.target, method=args.criterion)
    phases, clock = {}, (time.perf_counter(), time.process_time())

    def lap(name):
        nonlocal clock
        now = (time.perf_counter(), time.process_time())
        phases[name] = {"wall_s": now[0] - clock[0], "cpu_s": now[1] - clock[1]}
        clock = now

    calib = load_calibration(
        "builtin", args.calib_size, loaded.data_config, model_name=loaded.spec.timm_name
    )
    lap("calibration")
    spectrum = analyze_model(loaded.model, sparsity=args.target)
    lap("spectrum")
    counter = PassCounter(loaded.model, calib.images.shape)
    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    try:
        result = prune_model(
            loaded.model, calib.images, spectrum, config, spec=loaded.spec, input_shape=shape
        )
    finally:
        handle.remove()
    lap("prune_model")
    n = len(calib.images)
    ratio = result.headline["pruned_macs"] / result.headline["dense_macs"]
    passes = {k: v / n for k, v in counter.images.items() if k != "mac_count_forwards"}
    return {
        "model": args.prune_stage,
        "timm_name": loaded.spec.timm_name,
        "calibration_images": n,
        "method": config.method,
        "compensate": config.compensate,
        "target": args.target,
        "phases": phases,
        "total_wall_s": sum(p["wall_s"] for p in phases.values()),
        "total_cpu_s": sum(p["cpu_s"] for p in phases.values()),
        "passes": passes,
        "mac_count_forwards": counter.images["mac_count_forwards"],
        # a forward of the dense network = 1, a backward (activation gradients only) ≈ 1 more;
        # a pruned pass costs its MAC ratio
        "forward_equivalents": passes["dense"]
        + passes["dense_with_grad"]
        + passes["dense_backward"]
        + ratio * passes["pruned"],
        "headline": result.headline,
        "compensation_seconds": result.plan["compensation"].get("seconds"),
    }


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
    if args.prune_stage:
        payload = {
            "environment": env,
            "threads": args.threads,
            "command": " ".join(["python", "scripts/bench_prune_cpu.py", *(argv or sys.argv[1:])]),
            **prune_stage(args),
        }
        args.out_json.write_text(json.dumps(payload, indent=2) + "\n")
        print(json.dumps({k: payload[k] for k in ("phases", "passes", "total_cpu_s")}, indent=1))
        return 0
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
