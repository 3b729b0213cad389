"""efficientnet-lite0 (real ImageNet weights) pruned by 30 % of its MACs and compensated, calibrated
on what `--calib builtin` gives a user without images, scored with the accuracy suite's protocol.

    nice -n 19 .venv/bin/python scripts/lite0_builtin_calibration.py                # val split
    nice -n 19 .venv/bin/python scripts/lite0_builtin_calibration.py --variants builtin --seeds 0 1

Variants (all 128 seeded crops through lite0's eval transform):
- `builtin`: `load_calibration("builtin", …)`, the 13 photos of `builtin_photos()`;
- `builtin3`: the same code on the three photos `builtin` had before (scikit-learn china and
  flower, matplotlib grace_hopper);
- `suite14`: the accuracy suite's own lite0 calibration (`lite0_calibration.WIDE_PHOTOS`).
Each is pruned by the suite's `_ours` (default `mp_fisher_taylor`, `lsq+bn`) and scored by top-1
agreement with dense on the split's held-out crops (`accuracy_suite.held_out`) and on its own
calibration crops (how much the fit overfits). One JSON line per cell, also appended to
engines/lite0-builtin-calibration/log.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import accuracy_suite as suite_module  # noqa: E402
from lite0_calibration import calibration_images, jsonl_emitter  # noqa: E402

from mpdeploy.data import calibration as calibration_module  # noqa: E402

OUT = REPO_ROOT / "engines" / "lite0-builtin-calibration"
VARIANTS = ("builtin", "builtin3", "suite14")


def calibration_batch(variant: str, data_config: dict, size: int, seed: int) -> torch.Tensor:
    if variant == "suite14":
        return calibration_images(size, data_config, seed=seed)
    photos = calibration_module.builtin_photos()
    if variant == "builtin3":
        photos = [(label, path) for label, path in photos if not label.startswith("mpdeploy:")]
    with mock.patch.object(calibration_module, "builtin_photos", return_value=photos):
        calib = calibration_module.load_calibration(
            "builtin", size, data_config, seed=seed, model_name="tf_efficientnet_lite0"
        )
    assert len({source.split("#")[0] for source in calib.sources}) == min(size, len(photos))
    return calib.images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--split", default="val", choices=suite_module.SPLITS)
    parser.add_argument("--method", default="mp_fisher_taylor")
    parser.add_argument("--compensate", default="lsq+bn")
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration crop seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    emit = jsonl_emitter(OUT)
    key = suite_module.EFFNET
    lite0 = suite_module.load_model(key)
    held_out = suite_module.held_out(key, args.split)
    for seed in args.seeds:
        for variant in args.variants:
            calib = calibration_batch(variant, lite0.data_config, args.calib_size, seed)
            photos = suite_module.calibration_photos(lite0, calib)
            pruned = suite_module._ours(
                lite0, args.method, args.compensate, args.target, 0, calib, photos
            )
            pruned.eval()
            dense_macs = suite_module.counted_macs(lite0.model, lite0.input_shape)
            pruned_macs = suite_module.counted_macs(pruned, lite0.input_shape)
            calib_dense = suite_module.predictions(lite0.model, calib)
            emit(
                variant=variant,
                calib_seed=seed,
                calib_images=len(calib),
                split=args.split,
                method=args.method,
                compensate=args.compensate,
                target=args.target,
                mac_reduction=round(1.0 - pruned_macs / dense_macs, 4),
                held_out=held_out.description,
                held_out_agreement=suite_module.accuracy(pruned, held_out),
                calibration_agreement=float(
                    (suite_module.predictions(pruned, calib) == calib_dense).float().mean()
                ),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
