"""efficientnet-lite0 (real ImageNet weights) built end to end with `mpdeploy build`, then scored by
top-1 agreement of the pruned model with the dense one on held-out photo crops.

    python scripts/lite0_photo_agreement.py                  # --target-macs 0.3, method mp
    python scripts/lite0_photo_agreement.py --targets 0.3 0.5 --methods mp magnitude

Photo split (no photo is used on both sides):
- calibration: seeded crops of the `--calib builtin` photos (`builtin_photos()`: until
  2026-11-27 22:25 UTC scikit-learn's china and flower and matplotlib's grace_hopper, since then
  those and the ten of mpdeploy/data/photos), written as a folder and passed as `--calib DIR`;
- held out: seeded crops (25–100 % of the area, random flip) of scikit-image's `data` photos
  astronaut, chelsea, coffee, rocket, motorcycle_left, hubble_deep_field, retina.
Agreement = pruned top-1 == dense top-1 (PyTorch, both models as the build saved them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

WORK = REPO_ROOT / "engines" / "lite0-photos"
HELD_OUT_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)


def random_crops(photos: list, count: int, seed: int) -> list:
    """Seeded random crops (25–100 % of the area, random horizontal flip), round-robin."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.25, 1.0)
        cw, ch = int(w * np.sqrt(scale)), int(h * np.sqrt(scale))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.integers(2) else crop)
    return crops


def calibration_folder(count: int) -> Path:
    """Crops of the builtin photos, as JPEG files (what `--calib` reads); the folder name counts
    the photos (`calib-N`: the three of before 2026-11-27 22:25 UTC)."""
    from PIL import Image

    from mpdeploy.data.calibration import builtin_photos

    sources = builtin_photos()
    folder = WORK / (f"calib-{count}" if len(sources) == 3 else f"calib{len(sources)}-{count}")
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(path).convert("RGB") for _, path in sources]
    for i, crop in enumerate(random_crops(photos, count, seed=0)):
        crop.save(folder / f"crop{i:04d}.jpg", quality=95)
    return folder


def held_out_crops(count: int) -> list:
    import skimage
    from PIL import Image

    root = Path(skimage.__file__).parent / "data"
    photos = [Image.open(root / name).convert("RGB") for name in HELD_OUT_PHOTOS]
    return random_crops(photos, count, seed=1)


def build(
    weights: Path, calib: Path, calib_size: int, target: float, method: str, compensate: str
) -> Path:
    out = WORK / f"build-{method}{round(target * 100)}-{compensate}"
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "mpdeploy"),
        "build",
        "--model", "tf_efficientnet_lite0",
        "--weights", str(weights),
        "--target-macs", str(target),
        "--method", method,
        "--compensate", compensate,
        "--calib", str(calib),
        "--calib-size", str(calib_size),
        "--bench-batch", "1",
        "--bench-iterations", "20",
        "--out", str(out),
        "--force",
        "--quiet",
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return out


def agreement(build_dir: Path, crops: list) -> dict:
    import torch

    from mpdeploy.data.calibration import eval_transform
    from mpdeploy.models.spec import load_model

    manifest = json.loads((build_dir / "manifest.json").read_text())
    transform = eval_transform(manifest["model"]["data_config"])
    batch = torch.stack([transform(c) for c in crops])
    dense, _ = load_model(build_dir / "dense")
    pruned, _ = load_model(build_dir / "pruned")
    with torch.no_grad():
        ref = torch.cat([dense(b) for b in batch.split(32)])
        out = torch.cat([pruned(b) for b in batch.split(32)])
    prune_headline = manifest["stages"]["prune"]["headline"]
    return {
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).double().mean()),
        "top5_contains_dense_top1": float(
            (out.topk(5, 1).indices == ref.argmax(1, keepdim=True)).any(1).double().mean()
        ),
        "held_out_crops": len(crops),
        "mac_reduction": prune_headline.get("mac_reduction"),
        "dense_macs": prune_headline.get("dense_macs"),
        "pruned_macs": prune_headline.get("pruned_macs"),
        "verify": manifest["stages"].get("verify", {}).get("headline"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3])
    parser.add_argument("--methods", nargs="+", default=["mp"])
    parser.add_argument("--compensate", default="bias", help="see mpdeploy.prune.compensate")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=280)
    parser.add_argument("--out-json", type=Path, default=WORK / "agreement.json")
    args = parser.parse_args(argv)
    from convert_efficientnet_lite0 import convert

    weights = WORK / "efficientnet_lite0.safetensors"
    if not weights.is_file():
        convert(weights)
    calib = calibration_folder(args.calib_size)
    crops = held_out_crops(args.held_out)
    results = []
    for method in args.methods:
        for target in args.targets:
            build_dir = build(weights, calib, args.calib_size, target, method, args.compensate)
            record = {
                "method": method,
                "compensate": args.compensate,
                "target_macs": target,
                **agreement(build_dir, crops),
            }
            print(json.dumps(record), flush=True)
            results.append(record)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
