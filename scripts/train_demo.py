"""Train the bundled demo ViT on the digits train split and ship its weights inside the package.

    python scripts/train_demo.py            # ~60 epochs, a few minutes on 2 CPU cores

Writes `mpdeploy/models/weights/demo_vit.safetensors` and a JSON summary (`docs/demo-model.json`).
The test split is touched once, after the last epoch, to report top-1/top-5: no model selection.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mpdeploy.data.digits import RANDOM_STATE, TEST_SIZE, load_digits_split  # noqa: E402
from mpdeploy.fileio import atomic_path, sha256_file, write_json  # noqa: E402
from mpdeploy.models.demo import (  # noqa: E402
    DEMO_ARCH,
    DEMO_MEAN,
    DEMO_MODEL,
    DEMO_STD,
    demo_weights_path,
)

# The normalisation constants in mpdeploy/models/demo.py are rounded to 4 decimals.
STATS_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=3)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=demo_weights_path())
    parser.add_argument("--out-json", type=Path, default=REPO_ROOT / "docs" / "demo-model.json")
    return parser.parse_args(argv)


def to_unit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in 0..1, as timm's ToTensor does."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def check_normalisation(train_unit: torch.Tensor) -> tuple[float, float]:
    """The constants in demo.py must be the statistics of the training images."""
    mean, std = train_unit.mean().item(), train_unit.std(unbiased=False).item()
    if abs(mean - DEMO_MEAN[0]) > STATS_TOLERANCE or abs(std - DEMO_STD[0]) > STATS_TOLERANCE:
        raise SystemExit(
            f"train split mean/std {mean:.4f}/{std:.4f} differ from demo.py "
            f"{DEMO_MEAN[0]}/{DEMO_STD[0]}: update DEMO_MEAN/DEMO_STD"
        )
    return mean, std


def random_affine(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotation, scale, shear and shift of 0..1 images; the border stays black."""
    n = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-12.0, 12.0) * math.pi / 180.0
    scale = uniform(0.9, 1.1)
    shear = uniform(-0.15, 0.15)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (3.0 * 2 / batch.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift[:, 0]], dim=1),
            torch.stack([sin, cos + shear * sin, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    model.eval()
    logits = torch.cat([model(normalize(chunk)) for chunk in images.split(256)])
    top5 = logits.topk(5, dim=1).indices
    return {
        "top1": (top5[:, 0] == labels).float().mean().item(),
        "top5": (top5 == labels[:, None]).any(dim=1).float().mean().item(),
        "count": len(labels),
    }


def train(args: argparse.Namespace) -> dict:
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_labels = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    train_unit, test_unit = to_unit_tensor(train_images), to_unit_tensor(test_images)
    y_train, y_test = torch.from_numpy(train_labels), torch.from_numpy(test_labels)
    mean, std = check_normalisation(train_unit)

    model = timm.create_model(DEMO_MODEL, pretrained=False, drop_path_rate=args.drop_path)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}],
        lr=args.lr,
        weight_decay=0.0,
    )
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        loss_sum, correct = 0.0, 0
        for index in order.split(args.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, args.lr)
            inputs = normalize(random_affine(train_unit[index], generator))
            logits = model(inputs)
            loss = F.cross_entropy(logits, y_train[index], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(index)
            correct += (logits.argmax(1) == y_train[index]).sum().item()
        print(
            f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss_sum / len(y_train):.4f}  "
            f"train(aug) top-1 {correct / len(y_train):.4f}  {time.perf_counter() - start:6.1f}s",
            flush=True,
        )
    train_seconds = time.perf_counter() - start

    test = evaluate(model, test_unit, y_test)
    train_clean = evaluate(model, train_unit, y_train)
    print(f"test top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}  ({test['count']} images)")

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_weights(state, args.out, test["top1"])
    return {
        "model": DEMO_MODEL,
        "architecture": {k: v for k, v in DEMO_ARCH.items()},
        "param_count": sum(v.numel() for v in state.values()),
        "weights": str(_relative(args.out)),
        "file_bytes": args.out.stat().st_size,
        "sha256": sha256_file(args.out),
        "data": {
            "source": "sklearn.datasets.load_digits",
            "split": f"train_test_split(test_size={TEST_SIZE}, stratify=y, "
            f"random_state={RANDOM_STATE})",
            "train_count": len(y_train),
            "test_count": len(y_test),
            "train_per_class": np.bincount(train_labels, minlength=10).tolist(),
            "test_per_class": np.bincount(test_labels, minlength=10).tolist(),
            "train_mean": round(mean, 6),
            "train_std": round(std, 6),
        },
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": f"linear warmup {args.warmup_epochs} epochs, cosine to 0",
            "label_smoothing": args.label_smoothing,
            "drop_path_rate": args.drop_path,
            "augmentation": "random affine: rotate ±12°, scale 0.9–1.1, shear ±0.15, shift ±3 px",
            "seed": args.seed,
            "threads": args.threads,
            "train_seconds": round(train_seconds, 1),
        },
        "test_top1": round(test["top1"], 4),
        "test_top5": round(test["top5"], 4),
        "train_top1_clean": round(train_clean["top1"], 4),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "sklearn": __import__("sklearn").__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        },
        "date": datetime.date.today().isoformat(),
    }


def save_weights(state: dict[str, torch.Tensor], path: Path, test_top1: float) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", "architecture": DEMO_MODEL, "test_top1": f"{test_top1:.4f}"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = train(args)
    write_json(args.out_json, summary)
    print(f"wrote {args.out} ({summary['file_bytes']} bytes) and {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
