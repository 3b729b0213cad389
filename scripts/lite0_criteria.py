"""efficientnet-lite0 (real ImageNet weights): top-1 agreement with dense on held-out photo crops
for each criterion at one MAC target, in process (no spectrum: budget weights 1.0 for `mp`).

    python scripts/lite0_criteria.py --target 0.3 --methods mp mp_absolute magnitude taylor

Same photo split as scripts/lite0_photo_agreement.py (calibration: scikit-learn + matplotlib
photo crops; held out: scikit-image photo crops).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)


def main(argv: list[str] | None = None) -> int:
    import torch
    from convert_efficientnet_lite0 import lite0_model
    from lite0_photo_agreement import calibration_folder, held_out_crops

    from mpdeploy.data.calibration import eval_transform, load_calibration
    from mpdeploy.models import data_config_for
    from mpdeploy.prune import PruneConfig, prune_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument(
        "--methods", nargs="+", default=["mp", "mp_absolute", "magnitude", "taylor"]
    )
    parser.add_argument("--compensate", default="none")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=280)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)

    model = lite0_model()
    config = data_config_for(model, 224)
    calib = load_calibration(
        str(calibration_folder(args.calib_size)), args.calib_size, config
    ).images
    transform = eval_transform(config)
    held = torch.stack([transform(c) for c in held_out_crops(args.held_out)])
    with torch.no_grad():
        dense_top1 = torch.cat([model(b) for b in held.split(32)]).argmax(1)
    results = []
    for method in args.methods:
        cfg = PruneConfig(args.target, method=method, compensate=args.compensate)
        result = prune_model(model, calib, None, cfg, input_shape=(3, 224, 224))
        with torch.no_grad():
            top1 = torch.cat([result.model(b) for b in held.split(32)]).argmax(1)
        record = {
            "method": method,
            "compensate": args.compensate,
            "target_macs": args.target,
            "mac_reduction": result.headline["mac_reduction"],
            "top1_agreement": float((top1 == dense_top1).double().mean()),
            "held_out_crops": int(held.shape[0]),
        }
        print(json.dumps(record), flush=True)
        results.append(record)
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
