"""efficientnet-lite0 cross-validated over photos: what the suite's 3 val / 4 test photos cannot say.

The suite scores efficientnet-lite0 by top-1 agreement with its dense self on crops of three val
photos (choices) and four test photos (the report). Three photos are a thin base for a choice, and
half of the test crops have a runner-up class above half the top-1 probability, so a few photos
decide a verdict. Here the 17 photos that are not test photos (the 14 calibration photos of
`lite0_calibration.WIDE_PHOTOS` and the 3 val photos) are cut into K folds (a seeded permutation,
round-robin); each fold holds its photos out (96 crops, seed 1, as the suite's held-out sets) and
calibrates on 128 crops (seed 0) of the other photos, grouped by photo as a build groups them.
The test photos are never read.

Per fold and cell (criterion or N:M method, compensation, target; the suite's own `prune`):
agreement and KL(dense ‖ pruned) on the fold's held-out crops. Writes JSON lines and prints a
table of the means over folds.

    python scripts/lite0_photo_cv.py --out cv.jsonl                 # the default cells, 6 folds
    python scripts/lite0_photo_cv.py --cells mp_fisher_taylor/lsq+bn/0.3 --folds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_suite as suite  # noqa: E402
import lite0_calibration  # noqa: E402

KEY = suite.EFFNET
FOLDS = 6
PERMUTATION_SEED = 7
DEFAULT_CELLS = (
    "mp_fisher_taylor/lsq+bn/0.3",
    "nm_obs_shrink/lsq+bn/2:4",
    "nm_magnitude/lsq+bn/2:4",
)


def photo_names() -> list[str]:
    """The 17 non-test photos, as `source:file` (the calibration photos, then the val photos)."""
    return [*lite0_calibration.WIDE_PHOTOS, *(f"skimage:{n}" for n in suite.PHOTO_SPLITS["val"])]


def folds(names: list[str], count: int = FOLDS, seed: int = PERMUTATION_SEED) -> list[list[str]]:
    """`count` disjoint folds covering `names`, round-robin over a seeded permutation."""
    if not 2 <= count <= len(names):
        raise ValueError(f"{count} folds of {len(names)} photos")
    order = np.random.default_rng(seed).permutation(len(names))
    return [[names[i] for i in order[f::count]] for f in range(count)]


def load_photos(names: list[str]) -> dict:
    import skimage
    from PIL import Image

    paths = {
        **dict(zip(lite0_calibration.WIDE_PHOTOS, lite0_calibration.photo_paths(), strict=True)),
        **{
            f"skimage:{n}": Path(skimage.__file__).parent / "data" / n
            for n in suite.PHOTO_SPLITS["val"]
        },
    }
    return {n: Image.open(paths[n]).convert("RGB") for n in names}


def parse_cell(text: str) -> tuple[str, str, float | str]:
    try:
        method, compensate, target = text.split("/")
    except ValueError:
        raise ValueError(f"a cell is METHOD/COMPENSATION/TARGET, got {text!r}") from None
    if method not in suite.all_methods():
        raise ValueError(f"unknown method {method!r}")
    if compensate not in suite.compensations():
        raise ValueError(f"unknown compensation {compensate!r}")
    return method, compensate, target if ":" in target else float(target)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every fold shares: the model, its transform, the photos."""

    model: suite.SuiteModel
    transform: Callable
    photos: dict
    calib_size: int = 128
    eval_crops: int = 96
    prune_seed: int = 0  # the seed of the pruning's own randomness (a Fisher pass's label draws)


def run(
    cells,
    fold_ids,
    out: Path | None,
    calib_size: int = 128,
    eval_crops: int = 96,
    prune_seed: int = 0,
):
    """Every cell on every fold of `fold_ids`; the records, also appended to `out`."""
    from mpdeploy.data.calibration import eval_transform

    model = suite.load_model(KEY)
    names = photo_names()
    setup = Setup(
        model,
        eval_transform(model.data_config),
        load_photos(names),
        calib_size,
        eval_crops,
        prune_seed,
    )
    parts = folds(names)
    return [r for f in fold_ids for r in run_fold(setup, f, parts[f], cells, out)]


def run_fold(setup: Setup, fold: int, held: list[str], cells, out: Path | None) -> list[dict]:
    from lite0_photo_agreement import random_crops

    calib_names = [n for n in setup.photos if n not in held]
    crops = random_crops([setup.photos[n] for n in calib_names], setup.calib_size, seed=0)
    calib = torch.stack([setup.transform(c) for c in crops])
    photo_of = [calib_names[i % len(calib_names)] for i in range(setup.calib_size)]  # round-robin
    held_crops = random_crops([setup.photos[n] for n in held], setup.eval_crops, seed=1)
    images = torch.stack([setup.transform(c) for c in held_crops])
    with torch.no_grad():
        dense = setup.model.model(images).log_softmax(1)
    records = []
    for method, compensate, target in cells:
        start = time.perf_counter()
        pruned = suite.prune(KEY, method, compensate, target, setup.prune_seed, calib, photo_of)
        with torch.no_grad():
            logp = pruned.model.eval()(images).log_softmax(1)
        record = {
            "fold": fold,
            "held_out": held,
            "method": method,
            "compensate": compensate,
            "target": target,
            "agreement": float((logp.argmax(1) == dense.argmax(1)).float().mean()),
            "kl": float((dense.exp() * (dense - logp)).sum(1).mean()),  # KL(dense ‖ pruned)
            "mac_reduction": pruned.mac_reduction,
            "seconds": round(time.perf_counter() - start, 1),
            "calib_images": setup.calib_size,
            "eval_crops": setup.eval_crops,
            "prune_seed": setup.prune_seed,
        }
        records.append(record)
        print(json.dumps(record), flush=True)
        if out is not None:
            with out.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
    return records


def table(records: list[dict]) -> list[str]:
    """Per cell and prune seed: agreement and KL per fold and their means (a record without a
    prune seed is seed 0's: the script had no --prune-seed before 2026-11-29)."""
    cells: dict[tuple, dict[int, dict]] = {}
    for r in records:
        key = (r["method"], r["compensate"], str(r["target"]), r.get("prune_seed", 0))
        cells.setdefault(key, {})[r["fold"]] = r
    fold_ids = sorted({r["fold"] for r in records})
    head = "| method | compensation | target | prune seed | "
    head += " | ".join(f"fold {f}" for f in fold_ids)
    lines = [head + " | mean agreement | mean KL |", "|---" * (len(fold_ids) + 6) + "|"]
    for (method, compensate, target, seed), by_fold in sorted(cells.items()):
        shown = [by_fold.get(f) for f in fold_ids]
        values = " | ".join(
            "–" if r is None else f"{r['agreement']:.1%} / {r['kl']:.2f}" for r in shown
        )
        done = [r for r in shown if r is not None]
        agreement = sum(r["agreement"] for r in done) / len(done)
        kl = sum(r["kl"] for r in done) / len(done)
        lines.append(
            f"| {method} | {compensate} | {target} | {seed} | {values} | {agreement:.1%} | "
            f"{kl:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS))
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(FOLDS)))
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--prune-seed", type=int, default=0, help="the pruning's own seed (Fisher probes)"
    )
    args = parser.parse_args(argv)
    try:
        cells = [parse_cell(c) for c in args.cells]
        bad = [f for f in args.folds if not 0 <= f < FOLDS]
        if bad:
            raise ValueError(f"fold {bad[0]} is not in 0–{FOLDS - 1}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    records = run(cells, args.folds, args.out, prune_seed=args.prune_seed)
    print("\n".join(table(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
