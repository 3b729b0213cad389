"""tome.png of a `--tome` build: tokens entering each block, and top-1 against r on labelled
images (the demo's held-out digits, or a build's labelled `--train` folder)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.fileio import atomic_path

TOME_PNG = "tome.png"
SWEEP_POINTS = 6  # r values scored (0, the build's r and the largest r always among them)
SWEEP_IMAGES = 360  # at most (a seeded subset): all of the demo's 360 held-out test digits
SWEEP_MACS = 2e12  # fewer images for big models: ViT-B/16 (17.6 GMACs) scores 32 per r
SWEEP_MIN_IMAGES = 32


def sweep_values(largest: int, chosen: int, points: int | None = None) -> list[int]:
    """Evenly spaced r from 0 to `largest` (SWEEP_POINTS of them), plus the build's own r."""
    points = points or SWEEP_POINTS
    grid = np.linspace(0, largest, num=min(points, largest + 1)).round().astype(int)
    return sorted({*grid.tolist(), chosen})


def sweep_image_count(dense_macs: float, points: int) -> int:
    """Images per r so that the whole sweep stays near SWEEP_MACS (between 32 and 360)."""
    return int(np.clip(SWEEP_MACS / (points * dense_macs), SWEEP_MIN_IMAGES, SWEEP_IMAGES))


def labelled_sweep_set(
    timm_name: str,
    train: str | None,
    data_config: dict[str, Any],
    seed: int = 0,
    max_images: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(images, labels, what they are) for the top-1 sweep, or None without labelled data."""
    from mpdeploy.data.calibration import eval_transform
    from mpdeploy.data.imagefolder import labelled_images, open_image
    from mpdeploy.models.demo import DEMO_MODEL

    if timm_name == DEMO_MODEL:
        source, what = "demo", "held-out digits (test split)"
    elif train not in (None, "demo"):
        source, what = str(train), f"--train images ({train}; not held out)"
    else:
        return None
    try:
        items, _ = labelled_images(source)
    except UserError:  # an unlabelled --train folder (recovery by KL only): no top-1 to show
        return None
    limit = max_images or SWEEP_IMAGES
    if len(items) > limit:
        keep = np.random.default_rng(seed).choice(len(items), limit, replace=False)
        items = [items[i] for i in sorted(keep)]
    transform = eval_transform(data_config)
    pairs = [(label, open_image(item)) for label, item in items]
    pairs = [(label, img) for label, img in pairs if img is not None]
    if not pairs:
        return None
    images = torch.stack([transform(img) for _, img in pairs]).float()
    labels = torch.tensor([label for label, _ in pairs])
    return images, labels, f"{len(pairs)} {what}"


def top1_by_r(
    dense: nn.Module,
    settings: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    values: list[int],
    batch_size: int = 64,
) -> dict[int, float]:
    """Top-1 of `dense` with token merging at each r (schedule and proportional as `settings`)."""
    import dataclasses

    from mpdeploy.families.tome import apply_tome

    scores = {}
    for r in values:
        model = copy.deepcopy(dense).eval()
        if r:
            apply_tome(model, dataclasses.replace(settings, r=r))
        with torch.inference_mode():
            predicted = torch.cat([model(b).argmax(1) for b in images.split(batch_size)])
        scores[r] = float((predicted == labels).float().mean())
    return scores


def write_tome_png(path: Path, record: dict[str, Any], sweep: dict[str, Any] | None = None) -> Path:
    """Left: tokens entering each block (and after the last). Right, with a sweep: top-1 vs r."""
    from matplotlib.figure import Figure  # Agg canvas; never touches the global backend

    figure = Figure(figsize=(11 if sweep else 6, 4.2), layout="constrained")
    axes = figure.subplots(1, 2 if sweep else 1, squeeze=False)[0]
    tokens = [*record["tokens_per_block"], record["tokens_after_last_block"]]
    blocks = np.arange(len(tokens))
    colours = ["tab:blue"] * (len(tokens) - 1) + ["tab:gray"]
    axes[0].bar_label(axes[0].bar(blocks, tokens, color=colours), fontsize=7)
    axes[0].set_xticks(blocks, [*map(str, blocks[:-1]), "after\nlast"])
    axes[0].set_xlabel("block")
    axes[0].set_ylabel("tokens entering the block (incl. prefix)")
    axes[0].set_title(
        f"ToMe r={record['r']} ({record['schedule']}), "
        f"{record['prefix_tokens']} prefix + {record['patch_tokens']} patch tokens"
    )
    if sweep:
        values = [int(r) for r in sweep["top1_by_r"]]
        scores = [100 * v for v in sweep["top1_by_r"].values()]
        axes[1].plot(values, scores, "o-", color="tab:green")
        chosen = values.index(record["r"])
        axes[1].plot(values[chosen], scores[chosen], "o", color="tab:red", label="this build's r")
        axes[1].set_xlabel("r (tokens merged per block)")
        axes[1].set_ylabel("top-1 (%)")
        axes[1].set_title(f"dense model merging r tokens per block: {sweep['images']}", fontsize=9)
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return Path(path)
