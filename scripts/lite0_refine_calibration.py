"""efficientnet-lite0: does calibration refined towards the BatchNorm statistics prune better?

For each calibration seed: the accuracy suite's 128 lite0 calibration crops (the 14 photos of
`lite0_calibration.WIDE_PHOTOS`), and the same crops after `mpdeploy.data.refine.
refine_calibration(model, crops, STEPS)`. Each calibration set prunes the dense model with the
suite's defaults (`PruneConfig` / `SparsityConfig` defaults, `lsq+bn`) at each target; top-1
agreement with dense is scored on both photo splits (val, test), per photo. One JSON line per
cell on stdout and in --out. Refined tensors are cached (they take ~13 min per 128 crops at
40 steps on 2 cores).

    python scripts/lite0_refine_calibration.py --seeds 0 1 --targets 0.3 2:4 --out refine.jsonl

Results: docs/pruning.md, "Calibration refined towards the BatchNorm statistics".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_suite as suite  # noqa: E402
from lite0_calibration import calibration_images  # noqa: E402

from mpdeploy.data.refine import refine_calibration  # noqa: E402

KEY = suite.EFFNET


def refined(model, crops: torch.Tensor, steps: int, seed: int, cache: Path) -> torch.Tensor:
    path = cache / f"lite0_seed{seed}_steps{steps}.pt"
    if path.is_file():
        return torch.load(path)
    start = time.perf_counter()
    images, record = refine_calibration(model, crops, steps)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(images, path)
    print(
        json.dumps(
            {"seed": seed, "refine": record.record(), "seconds": round(time.perf_counter() - start)}
        ),
        flush=True,
    )
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--targets", nargs="+", default=["0.3"], help="MAC targets or 2:4")
    parser.add_argument("--nm-method", default="obs")
    parser.add_argument("--cache", type=Path, default=Path("engines/suite/refined"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = suite.load_model(KEY)
    defaults = suite.defaults()
    for seed in args.seeds:
        crops = calibration_images(suite.SETTINGS.calib_size, model.data_config, seed=seed)
        sets = {
            "photos": crops,
            "refined": refined(model.model, crops, args.steps, seed, args.cache),
        }
        for name, images in sets.items():
            for target in args.targets:
                method = defaults["method"] if target != "2:4" else "nm_" + args.nm_method
                pruned = suite.prune(
                    KEY,
                    method,
                    defaults["compensate"],
                    target if target == "2:4" else float(target),
                    0,
                    images,  # what `prune` calibrates on
                )
                for split in ("val", "test"):
                    held = suite.held_out(KEY, split)
                    hits = (
                        suite.predictions(pruned.model.eval(), held.images) == held.labels
                    ).float()
                    photos = suite.PHOTO_SPLITS[split]  # crops cycle through the photos
                    cell = {
                        "seed": seed,
                        "calibration": name,
                        "steps": args.steps if name == "refined" else 0,
                        "method": method,
                        "target": target,
                        "split": split,
                        "agreement": round(float(hits.mean()), 4),
                        "per_photo": {
                            p.split(".")[0]: round(float(hits[i :: len(photos)].mean()), 3)
                            for i, p in enumerate(photos)
                        },
                    }
                    print(json.dumps(cell), flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(cell) + "\n")


if __name__ == "__main__":
    main()
