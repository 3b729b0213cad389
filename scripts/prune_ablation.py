"""Validation-split ablation of pruning criteria × compensation (the runs that chose the defaults).

    python scripts/prune_ablation.py --models resnet26_n vit_t --methods mp mp_fisher taylor \
        --compensate none bias lsq lsq+bn --targets 0.3 0.5 0.7 --out ablation.jsonl

Models, splits and calibration come from scripts/accuracy_suite.py (digits `val` split, 128
fit-split calibration images); one JSON line per cell, appended, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_suite as suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["mp", "mp_fisher", "taylor"])
    parser.add_argument("--compensate", nargs="+", default=["none", "lsq+bn"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--split", default="val", choices=["val"])
    parser.add_argument("--inputs", default="dense", choices=["dense", "pruned"])
    parser.add_argument(
        "--sparsity", default=None, help="k:n: N:M methods (cast, cast_fisher, magnitude) instead"
    )
    parser.add_argument("--recover-epochs", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from mpdeploy.errors import UserError
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.spectrum import analyze_model

    torch.set_num_threads(args.threads)
    done = set()
    if args.out.is_file():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add(
                (r["model"], r["method"], r["compensate"], r["target"], r["epochs"], r["inputs"])
            )
    if args.sparsity:
        return nm_cells(args, done)
    for key in args.models:
        model = suite.load_model(key)
        data = suite.held_out(key, args.split)
        calib = suite.calibration(key)
        dense = suite.accuracy(model.model, data)
        for target in args.targets:
            spectrum = analyze_model(model.model, sparsity=target)
            for method in args.methods:
                for comp in args.compensate:
                    cell = (key, method, comp, target, args.recover_epochs, args.inputs)
                    if cell in done:
                        continue
                    start = time.perf_counter()
                    config = PruneConfig(
                        target_macs=target,
                        method=method,
                        compensate=comp,
                        compensate_inputs=args.inputs,
                    )
                    try:
                        result = prune_model(
                            model.model, calib, spectrum, config, input_shape=model.input_shape
                        )
                    except UserError as exc:  # e.g. a target out of reach for this model
                        print(f"{key} {method} {comp} {target}: {exc}", flush=True)
                        break
                    pruned = result.model
                    if args.recover_epochs:
                        pruned, _ = suite.recovered(
                            key,
                            suite.Pruned(pruned, None, 0, 0, 0, 0, 0, {}),
                            args.recover_epochs,
                            0,
                        )
                    row = {
                        "model": key,
                        "method": method,
                        "compensate": comp,
                        "target": target,
                        "epochs": args.recover_epochs,
                        "inputs": args.inputs,
                        "mac_reduction": round(result.headline["mac_reduction"], 4),
                        "dense": dense,
                        "top1": suite.accuracy(pruned, data),
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                    print(json.dumps(row), flush=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


def nm_cells(args: argparse.Namespace, done: set) -> int:
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    k, n = (int(v) for v in args.sparsity.split(":"))
    for key in args.models:
        model = suite.load_model(key)
        data = suite.held_out(key, args.split)
        calib = suite.calibration(key)
        dense = suite.accuracy(model.model, data)
        for method in args.methods:
            for comp in args.compensate:
                cell = (key, method, comp, args.sparsity, args.recover_epochs, args.inputs)
                if cell in done:
                    continue
                start = time.perf_counter()
                config = SparsityConfig(k, n, method=method, compensate=comp)
                result = sparsify(model.model, calib, config, input_shape=model.input_shape)
                pruned = result.model
                if args.recover_epochs:
                    pruned, _ = suite.recovered(
                        key,
                        suite.Pruned(pruned, result.masks, 0, 0, 0, 0, 0, {}),
                        args.recover_epochs,
                        0,
                    )
                row = {
                    "model": key,
                    "method": method,
                    "compensate": comp,
                    "target": args.sparsity,
                    "epochs": args.recover_epochs,
                    "inputs": args.inputs,
                    "mac_reduction": round(result.headline["sparse_mac_reduction"], 4),
                    "dense": dense,
                    "top1": suite.accuracy(pruned, data),
                    "seconds": round(time.perf_counter() - start, 2),
                }
                print(json.dumps(row), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
