"""Evidence for N:M sparsity (docs/sparsity.md): CAST vs magnitude, with and without permutation.

    python scripts/sparsity_eval.py                       # demo model, 2:4, 0 and 1 recovery epochs
    python scripts/sparsity_eval.py --sequential off block layer   # also sequential CAST
    python scripts/sparsity_eval.py --vit-b-timing        # ViT-B/16 2:4 CAST timing instead

On the bundled demo ViT: held-out top-1 (digits test split) of the dense model and of every
(method, permutation) variant, before and after recovery, and the pre-recovery logit error
‖Δlogits‖₂ against the dense model on the held-out images. Writes a JSON record (--out-json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)
from mpdeploy.data.calibration import eval_transform, load_calibration  # noqa: E402
from mpdeploy.data.digits import load_digits_split  # noqa: E402
from mpdeploy.fileio import write_json  # noqa: E402
from mpdeploy.models.demo import DEMO_MODEL  # noqa: E402
from mpdeploy.prune.nm import SparsityConfig, sparsify  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="hub", help="demo weights: bundled (hub) or a file")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recover-epochs", type=int, default=1, help="0 skips recovery")
    parser.add_argument(
        "--sequential",
        nargs="+",
        default=["off"],
        choices=["off", "block", "layer"],
        help="CAST capture modes to compare (magnitude ignores it)",
    )
    parser.add_argument(
        "--vit-b-timing", action="store_true", help="time 2:4 CAST on ViT-B/16 instead of the demo"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-json", type=Path, default=None)
    return parser.parse_args(argv)


def held_out(data_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images, labels = load_digits_split("test")
    transform = eval_transform(data_config)
    batch = torch.stack([transform(Image.fromarray(img, mode="RGB")) for img in images])
    return batch.float(), torch.from_numpy(labels)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images[i : i + 128]) for i in range(0, len(images), 128)]).float()


def recovered(result, teacher, data_config, epochs: int, seed: int) -> torch.nn.Module:
    from mpdeploy.prune.recover import RecoverConfig, recover

    student = copy.deepcopy(result.model)
    config = RecoverConfig(epochs=epochs, seed=seed, progress=False)
    return recover(student, teacher, "demo", data_config, config, masks=result.masks).model


def demo_eval(args: argparse.Namespace) -> dict[str, Any]:
    from mpdeploy.models import create_model

    k, n = (int(v) for v in args.pattern.split(":"))
    loaded = create_model("demo", weights=args.weights)
    dense, data_config = loaded.model, loaded.data_config
    images, labels = held_out(data_config)
    dense_logits = logits_of(dense, images)
    rows: list[dict[str, Any]] = [
        {"variant": "dense", "top1": float((dense_logits.argmax(1) == labels).float().mean())}
    ]
    for seed in args.seeds:
        calib = load_calibration(
            "builtin", args.calib_size, data_config, seed=seed, model_name=DEMO_MODEL
        )
        variants = [("cast", mode) for mode in args.sequential] + [("magnitude", "off")]
        for method, sequential in variants:
            for permute in (False, True):
                start = time.perf_counter()
                config = SparsityConfig(
                    k, n, method=method, permute=permute, seed=seed, sequential=sequential
                )
                result = sparsify(dense, calib.images, config, input_shape=tuple(images.shape[1:]))
                seconds = time.perf_counter() - start
                sparse_logits = logits_of(result.model, images)
                delta = (sparse_logits - dense_logits).norm(dim=1)
                seq = f" seq-{sequential}" if sequential != "off" else ""
                row = {
                    "variant": f"{args.pattern} {method}{seq}{' +perm' if permute else ''}",
                    "method": method,
                    "sequential": sequential,
                    "permute": permute,
                    "seed": seed,
                    "top1": float((sparse_logits.argmax(1) == labels).float().mean()),
                    "delta_logits_l2_mean": float(delta.mean()),
                    "delta_logits_l2_max": float(delta.max()),
                    "top1_agreement_with_dense": float(
                        (sparse_logits.argmax(1) == dense_logits.argmax(1)).float().mean()
                    ),
                    "sparsify_seconds": round(seconds, 2),
                    "timing_s": result.report["timing_s"],
                    "headline": result.headline,
                }
                if args.recover_epochs:
                    model = recovered(result, dense, data_config, args.recover_epochs, seed)
                    row[f"top1_after_{args.recover_epochs}_epoch"] = float(
                        (logits_of(model, images).argmax(1) == labels).float().mean()
                    )
                rows.append(row)
                print(_row_line(row, args.recover_epochs), flush=True)
    return {
        "model": DEMO_MODEL,
        "weights": loaded.weights_source,
        "pattern": args.pattern,
        "held_out_images": len(labels),
        "calibration_images": args.calib_size,
        "rows": rows,
    }


def _row_line(row: dict[str, Any], epochs: int) -> str:
    after = row.get(f"top1_after_{epochs}_epoch")
    return (
        f"{row['variant']:<30} seed {row['seed']}  top-1 {row['top1']:.4f}"
        f"{f' → {after:.4f} after {epochs} ep' if after is not None else ''}"
        f"  ‖Δlogits‖ mean {row['delta_logits_l2_mean']:.4f} max {row['delta_logits_l2_max']:.4f}"
    )


def vit_b_timing(args: argparse.Namespace) -> dict[str, Any]:
    """2:4 CAST on a random-init vit_base_patch16_224 with 256 builtin calibration photos."""
    from mpdeploy.models import create_model

    loaded = create_model("vit_base_patch16_224", weights="none")
    calib = load_calibration("builtin", args.calib_size, loaded.data_config, seed=0)
    start = time.perf_counter()
    result = sparsify(
        loaded.model, calib.images, SparsityConfig(2, 4), input_shape=tuple(calib.images.shape[1:])
    )
    record = {
        "model": "vit_base_patch16_224 (random init)",
        "config": "2:4 cast, permute=True, max_rows=4096, 256 builtin photo crops",
        "total_s": round(time.perf_counter() - start, 1),
        "phases_s": result.report["timing_s"],
        "sparse_layers": result.headline["sparse_layers"],
        "sparse_mac_reduction": result.headline["sparse_mac_reduction"],
        "theoretical_speedup": result.headline["theoretical_speedup"],
    }
    print(f"ViT-B/16 2:4 CAST: {record}", flush=True)
    return record


def environment(threads: int) -> dict[str, Any]:
    import onnx
    import polygraphy
    import timm

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{threads} torch threads, no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "polygraphy": polygraphy.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {"environment": environment(args.threads)}
    if args.vit_b_timing:
        record["vit_b16_timing"] = vit_b_timing(args)
    else:
        record["demo"] = demo_eval(args)
    if args.out_json:
        write_json(args.out_json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
