"""`mpdeploy eval`: top-1/top-5 of the dense model, the pruned model and the built engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpdeploy.errors import UserError
from mpdeploy.fileio import write_json


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((topk == labels[:, None]).any(axis=1).sum())


def evaluate_build(
    build_dir: Path, data: str, *, batch_size: int = 32, limit: int | None = None
) -> dict[str, Any]:
    """Evaluate the three models of a build on labelled images; writes eval.json."""
    from tqdm.auto import tqdm

    from mpdeploy.backends import get_backend, read_engine_record
    from mpdeploy.data.calibration import eval_transform
    from mpdeploy.data.imagefolder import labelled_images, open_image
    from mpdeploy.manifest import Manifest
    from mpdeploy.models.spec import load_model

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    build_dir = Path(build_dir)
    manifest = Manifest.load(build_dir)
    items, classes = labelled_images(data)
    num_classes = manifest.model["num_classes"]
    if len(classes) > num_classes:
        raise UserError(f"{data} has {len(classes)} classes but the model predicts {num_classes}")
    if limit:
        items = items[: int(limit)]
    transform = eval_transform(manifest.model["data_config"])
    dense, _ = load_model(build_dir / "dense")
    pruned, _ = load_model(build_dir / "pruned")
    record = read_engine_record(build_dir)
    runner = get_backend(record.backend).runner(record, build_dir, name="engine")

    hits = {name: {"top1": 0, "top5": 0} for name in ("dense", "pruned", "engine")}
    count = unreadable = 0
    with runner, torch.inference_mode():
        batches = range(0, len(items), batch_size)
        for start in tqdm(batches, desc="eval", unit="batch", leave=False, disable=None):
            chunk = items[start : start + batch_size]
            images, labels = [], []
            for label, item in chunk:
                img = open_image(item)
                if img is None:
                    unreadable += 1
                    continue
                images.append(transform(img))
                labels.append(label)
            if not images:
                continue
            x = torch.stack(images).float()
            y = np.asarray(labels)
            outputs = {
                "dense": dense(x).numpy(),
                "pruned": pruned(x).numpy(),
                "engine": np.asarray(
                    runner.infer({record.input_name: x.numpy()})[record.output_name],
                    dtype=np.float32,
                ),
            }
            for name, logits in outputs.items():
                hits[name]["top1"] += topk_hits(logits, y, 1)
                hits[name]["top5"] += topk_hits(logits, y, 5)
            count += len(labels)
    if count == 0:
        raise UserError(f"no readable images in {data}")
    report = {
        "data": data,
        "images": count,
        "unreadable": unreadable,
        "classes": len(classes),
        "engine": f"{record.backend} {record.precision} ({record.artifact})",
        "results": {
            name: {"top1": h["top1"] / count, "top5": h["top5"] / count} for name, h in hits.items()
        },
    }
    write_json(build_dir / "eval.json", report)
    return report


def format_eval(report: dict[str, Any]) -> str:
    lines = [
        f"{report['images']} images from {report['data']} ({report['classes']} classes"
        f"{', ' + str(report['unreadable']) + ' unreadable skipped' if report['unreadable'] else ''})",
        f"  {'model':<8} {'top-1':>8} {'top-5':>8}",
    ]
    for name, r in report["results"].items():
        lines.append(f"  {name:<8} {r['top1']:>8.2%} {r['top5']:>8.2%}")
    lines.append(f"  engine = {report['engine']}")
    return "\n".join(lines)
