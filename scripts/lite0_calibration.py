"""Calibration crops for efficientnet-lite0 in the accuracy suite: every photo that ships in the
environment and that neither held-out split uses.

`mpdeploy`'s `builtin` calibration had three photos (scikit-learn china and flower, matplotlib
grace_hopper) until 2026-11-27 22:25 UTC; it has 13 now, ten of them shipped in
mpdeploy/data/photos (scripts/lite0_builtin_calibration.py measures both). Scored, fitted and BatchNorm-corrected on crops of only those three, a 30 %-pruned
lite0 kept 3.1 % top-1 agreement with dense on the val split's held-out crops (calibration crops
themselves: 90 %); on crops of these 14 photos, 41.7 % (docs/pruning.md, "Diagnosis"). Gray
photos are converted to RGB. motorcycle_right is the other half of the test split's stereo pair
and stays out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WIDE_PHOTOS = (
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
    "matplotlib:Minduka_Present_Blue_Pack.png",
    "skimage:ihc.png",
    "skimage:camera.png",
    "skimage:coins.png",
    "skimage:moon.png",
    "skimage:brick.png",
    "skimage:grass.png",
    "skimage:gravel.png",
    "skimage:clock_motion.png",
    "skimage:page.png",
    "skimage:cell.png",
)


def photo_paths() -> list[Path]:
    import matplotlib
    import skimage
    import sklearn

    roots = {
        "sklearn": Path(sklearn.__file__).parent / "datasets" / "images",
        "matplotlib": Path(matplotlib.get_data_path()) / "sample_data",
        "skimage": Path(skimage.__file__).parent / "data",
    }
    return [roots[where] / name for where, name in (p.split(":") for p in WIDE_PHOTOS)]


def calibration_images(count: int, data_config: dict[str, Any], seed: int = 0) -> torch.Tensor:
    """`count` seeded crops (25–100 % of the area, random flip) of WIDE_PHOTOS, round-robin,
    through the model's eval transform."""
    from lite0_photo_agreement import random_crops
    from PIL import Image

    from mpdeploy.data.calibration import eval_transform

    photos = [Image.open(path).convert("RGB") for path in photo_paths()]
    transform = eval_transform(data_config)
    return torch.stack([transform(c) for c in random_crops(photos, count, seed=seed)])


def calibration_groups(count: int) -> list[str]:
    """Per crop of `calibration_images(count, ...)`, the photo it was cut from (round-robin): what
    `sparsify(groups=...)` needs for `obs_shrink`, as `CalibrationSet.groups` is for a build."""
    return [WIDE_PHOTOS[i % len(WIDE_PHOTOS)] for i in range(count)]


def photo_stream(count: int, data_config: dict[str, Any], seed: int = 0):
    """Fresh random crops of WIDE_PHOTOS every epoch, `count` per epoch: what label-free recovery
    distils on (`mpdeploy.pipeline.label_free_train_set` does the same with the builtin photos)."""
    from PIL import Image

    from mpdeploy.data.calibration import PhotoCropStream

    photos = [Image.open(path).convert("RGB") for path in photo_paths()]
    return PhotoCropStream(photos, data_config, count, seed, origin="lite0_calibration.WIDE_PHOTOS")


def jsonl_emitter(out: Path) -> Callable[..., None]:
    """emit(**record): print the record as one JSON line, with seconds since this call as "t",
    and append it to out/log.jsonl (the diagnosis scripts' log)."""
    start = time.time()

    def emit(**rec: Any) -> None:
        rec["t"] = round(time.time() - start, 1)
        line = json.dumps(rec)
        print(line, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.jsonl", "a") as log:
            log.write(line + "\n")

    return emit
