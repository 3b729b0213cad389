"""Top-1 of the bundled demo ViT with token merging at every r that fits, ± 1 recovery epoch, and
ToMe combined with 50 % MP structured pruning.

    python scripts/tome_eval.py                                 # r = 0 … largest, recovery 1 epoch
    python scripts/tome_eval.py --r 2 4 8 --recover-epochs 0 --prune-r 4

Scored on the digits held-out test split (360 images) with the model's eval transform, as
scripts/prune_eval.py does; recovery distils from the dense demo model on the digits train split
with merging active in the student (`recover(..., train="demo")`). MACs are counted on a real
forward (`count_macs`). Writes JSON (default docs/tome-eval.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from prune_eval import held_out_set, top1  # noqa: E402

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", nargs="+", type=int, default=None, help="default: 0 … largest")
    parser.add_argument("--schedule", default="constant", choices=["constant", "decreasing"])
    parser.add_argument("--recover-epochs", type=int, default=1)
    parser.add_argument(
        "--recover-r", nargs="*", type=int, default=None, help="r values to recover (default: all)"
    )
    parser.add_argument("--prune-target", type=float, default=0.5)
    parser.add_argument("--prune-r", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-json", type=Path, default=REPO_ROOT / "docs" / "tome-eval.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.families.tome import ToMeSettings, apply_tome, largest_r
    from mpdeploy.models import create_model
    from mpdeploy.models.demo import DEMO_MODEL
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.prune.macs import count_macs
    from mpdeploy.prune.recover import RecoverConfig, recover
    from mpdeploy.spectrum import analyze_model

    torch.set_num_threads(args.threads)
    loaded = create_model(DEMO_MODEL)
    dense = loaded.model
    shape = (1, 3, 32, 32)
    dense_macs = count_macs(dense, shape).total_macs
    images, labels = held_out_set(loaded.data_config)
    values = args.r if args.r is not None else list(range(largest_r(dense, args.schedule) + 1))

    def score(model, *, target: float, r: int, extra: dict | None = None) -> dict:
        start = time.perf_counter()
        row = {
            "r": r,
            "prune_target": target,
            "tokens_per_block": model.tome.tokens_per_block if r else None,
            "macs": count_macs(model, shape).total_macs,
            "top1": top1(model, images, labels),
            **(extra or {}),
        }
        row["mac_reduction"] = 1 - row["macs"] / dense_macs
        if args.recover_epochs and (args.recover_r is None or r in args.recover_r):
            recovered = recover(
                copy.deepcopy(model),
                dense,
                "demo",
                loaded.data_config,
                RecoverConfig(epochs=args.recover_epochs, seed=0, progress=False),
            )
            row["top1_recovered"] = top1(recovered.model, images, labels)
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        return row

    rows = []
    for r in values:
        model = copy.deepcopy(dense)
        if r:
            apply_tome(model, ToMeSettings(r, args.schedule))
        rows.append(score(model, target=0.0, r=r))
    if args.prune_target > 0:
        calib = load_calibration("builtin", 256, loaded.data_config, model_name=DEMO_MODEL)
        spectrum = analyze_model(dense, sparsity=args.prune_target)
        for r in [0, *args.prune_r]:
            model = copy.deepcopy(dense)
            if r:
                apply_tome(model, ToMeSettings(r, args.schedule))
            config = PruneConfig(target_macs=args.prune_target, method="mp")
            result = prune_model(model, calib.images, spectrum, config, input_shape=shape[1:])
            rows.append(score(result.model, target=args.prune_target, r=r))
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_end": os.getloadavg(),
        "model": DEMO_MODEL,
        "weights": loaded.weights_source,
        "eval_set": "digits test",
        "test_images": int(labels.numel()),
        "schedule": args.schedule,
        "recover_epochs": args.recover_epochs,
        "dense_macs": dense_macs,
        "command": " ".join(["python", "scripts/tome_eval.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    args.out_json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
