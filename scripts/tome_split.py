"""One total MAC reduction, split between token merging and structured pruning (accuracy suite).

For each ViT of the accuracy suite and each r that fits, ToMe merges r tokens per block
(`apply_tome`, constant schedule, proportional attention), the merging model is pruned by the
default criterion and compensation to what is left of the total (target relative to the merging
model: 1 − (1 − total) · dense MACs / merging MACs), and the held-out top-1 is counted. r = 0 is
pruning alone. One JSON line per (training, model, r, total, prune seed), appended to
docs/tome-split.jsonl; results in docs/tome.md ("One MAC budget, two ways to spend it").

    python scripts/tome_split.py --split val --totals 0.7 0.5
    python scripts/tome_split.py --models vit_t --trainings 0 --totals 0.7 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_suite as s  # noqa: E402

from mpdeploy.families.tome import ToMeSettings, apply_tome, largest_r  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val", choices=s.SPLITS)
    parser.add_argument("--totals", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--models", nargs="+", default=["vit_t", "vit_s", "demo"])
    parser.add_argument("--trainings", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out-jsonl", type=Path, default=REPO_ROOT / "docs" / "tome-split.jsonl", help="appended"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = s.defaults()
    method, compensate = chosen["method"], chosen["compensate"]
    args.out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with args.out_jsonl.open("a") as out:
        for train in args.trainings:
            s.SETTINGS = dataclasses.replace(s.SETTINGS, train_seed=train, threads=args.threads)
            for key in args.models:
                if train and key not in s.train_suite.SUITE:
                    continue  # the demo has one training
                suite = s.load_model(key)
                data = s.held_out(key, args.split)
                images = s.calibration(key)
                photos = s.calibration_photos(suite, images)
                dense = s.counted_macs(suite.model, suite.input_shape)
                dense_top1 = s.accuracy(suite.model, data)
                for r in range(largest_r(suite.model) + 1):
                    merged = copy.deepcopy(suite.model).eval()
                    if r:
                        apply_tome(merged, ToMeSettings(r))
                    tome_macs = s.counted_macs(merged, suite.input_shape)
                    tome_top1 = s.accuracy(merged, data)
                    for total in args.totals:
                        target = 1.0 - (1.0 - total) * dense / tome_macs
                        for seed in args.seeds:
                            start = time.perf_counter()
                            if target <= 0.02:  # merging alone reaches the total
                                top1, macs = tome_top1, tome_macs
                            else:
                                model = s._ours(
                                    dataclasses.replace(suite, model=merged),
                                    method,
                                    compensate,
                                    target,
                                    seed,
                                    images,
                                    photos,
                                )
                                top1 = s.accuracy(model, data)
                                macs = s.counted_macs(model, suite.input_shape)
                            row = {
                                "train_seed": train,
                                "model": key,
                                "split": args.split,
                                "r": r,
                                "total": total,
                                "prune_target": round(target, 4),
                                "seed": seed,
                                "method": method,
                                "compensate": compensate,
                                "top1": top1,
                                "eval_images": int(len(data.labels)),
                                "mac_reduction": 1.0 - macs / dense,
                                "tome_mac_reduction": 1.0 - tome_macs / dense,
                                "tome_top1": tome_top1,
                                "dense_top1": dense_top1,
                                "seconds": round(time.perf_counter() - start, 2),
                                "date": datetime.datetime.now(datetime.UTC).isoformat(
                                    timespec="seconds"
                                ),
                            }
                            out.write(json.dumps(row) + "\n")
                            out.flush()
                            print(
                                f"t{train} {key} r={r} total {total:.0%}: prune {target:.3f}, "
                                f"seed {seed}: top-1 {top1:.4f}, "
                                f"{row['mac_reduction']:.3f} fewer MACs",
                                flush=True,
                            )
                            if target <= 0.02:
                                break  # nothing random left
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
