"""ONNX Runtime CPU latency of a dense ViT vs the same ViT with token merging at several r.

    python scripts/bench_tome.py                                   # vit_b16, r = 8 and 13, batch 1 and 8
    python scripts/bench_tome.py --r 4 8 13 16 --batches 1 8 32 --runs 30

Random weights (speed does not depend on them). The dense model and each ToMe variant are
exported with `export_onnx` (the exporter `mpdeploy build` uses) and timed in one process through
ONNX Runtime sessions, interleaved run by run (dense, r₁, r₂, … then again) after warm-up, so load
drifts hit all variants alike; medians and p90 per batch size. MACs are counted on a real forward
(`count_macs`). Writes JSON (default docs/tome-bench-cpu.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--r", nargs="+", type=int, default=[8, 13], help="tokens merged per block")
    parser.add_argument("--schedule", default="constant", choices=["constant", "decreasing"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant and batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    parser.add_argument("--out-json", type=Path, default=REPO_ROOT / "docs" / "tome-bench-cpu.json")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or min(args.batches) < 1 or min(args.r) < 1:
        parser.error("--runs, --batches and --r must be ≥ 1, --warmup ≥ 0")
    return args


def build_variants(args: argparse.Namespace, workdir: Path) -> tuple[dict, dict, tuple]:
    """Export dense and every ToMe variant; return ({name: onnx path}, {name: info}, input shape)."""
    import torch

    from mpdeploy.export import export_onnx
    from mpdeploy.families.tome import ToMeSettings, apply_tome
    from mpdeploy.models import create_model
    from mpdeploy.prune.macs import count_macs

    loaded = create_model(args.model, weights="none")
    shape = tuple(int(v) for v in loaded.data_config["input_size"])
    models = {"dense": loaded.model}
    info: dict[str, dict] = {"dense": {"r": 0}}
    for r in args.r:
        model = copy.deepcopy(loaded.model)
        record = apply_tome(model, ToMeSettings(r, args.schedule))
        models[f"tome_r{r}"] = model
        info[f"tome_r{r}"] = record.to_dict()
    paths = {}
    for name, model in models.items():
        start = time.perf_counter()
        export = export_onnx(model, workdir / f"{name}.onnx", shape, exporter=args.exporter)
        info[name]["macs"] = count_macs(model, (1, *shape)).total_macs
        info[name]["exporter"] = export.exporter
        info[name]["export_s"] = round(time.perf_counter() - start, 1)
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            info[name]["reference"] = model(x).numpy()
        paths[name] = workdir / f"{name}.onnx"
        print(f"exported {name} in {info[name]['export_s']} s", flush=True)
    return paths, info, shape


def time_interleaved(sessions: dict, x: np.ndarray, runs: int, warmup: int) -> dict[str, list]:
    from mpdeploy.export import INPUT_NAME

    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, {INPUT_NAME: x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order too
            start = time.perf_counter()
            sessions[name].run(None, {INPUT_NAME: x})
            times[name].append(time.perf_counter() - start)
    return times


def environment() -> dict:
    import onnxruntime
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mpdeploy.backends.onnxruntime import make_session
    from mpdeploy.export import INPUT_NAME

    torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tome-") as tmp:
        paths, info, shape = build_variants(args, Path(tmp))
        sessions = {name: make_session(path, threads=args.threads) for name, path in paths.items()}
        x2 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)).numpy()
        for name, session in sessions.items():
            got = session.run(None, {INPUT_NAME: x2})[0]
            info[name]["parity_max_abs"] = float(np.abs(got - info[name].pop("reference")).max())
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            times = time_interleaved(sessions, x, args.runs, args.warmup)
            dense_ms = 1e3 * float(np.median(times["dense"]))
            for name in sessions:
                median = 1e3 * float(np.median(times[name]))
                mac_ratio = info["dense"]["macs"] / info[name]["macs"]
                rows.append(
                    {
                        "variant": name,
                        "r": info[name]["r"],
                        "batch": batch,
                        "median_ms": median,
                        "p90_ms": 1e3 * float(np.percentile(times[name], 90)),
                        "speedup": dense_ms / median,
                        "mac_ratio": mac_ratio,
                        "speedup_over_mac_ratio": dense_ms / median / mac_ratio,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    env["load_average_at_end"] = os.getloadavg()
    payload = {
        "environment": env,
        "model": args.model,
        "schedule": args.schedule,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "command": " ".join(["python", "scripts/bench_tome.py", *(argv or sys.argv[1:])]),
        "variants": info,
        "rows": rows,
    }
    args.out_json.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown(payload))
    return 0


def markdown(payload: dict) -> str:
    lines = [
        "| variant | batch | median ms | p90 ms | speed-up | MAC ratio | speed-up / MAC ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['variant']} | {row['batch']} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
            f"{row['speedup']:.2f}× | {row['mac_ratio']:.2f}× | {row['speedup_over_mac_ratio']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
