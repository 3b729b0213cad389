"""Train the accuracy suite's small models on scikit-learn digits, seeded, into a cache outside git.

    python scripts/train_suite.py                     # every missing model (a few minutes each)
    python scripts/train_suite.py --models vit_t --force

The suite (`SUITE`) spans the ViT, ConvNeXtV2 and ResNet families and two sizes; every model is a
stock timm architecture with only `num_classes` and (ViTs) the token geometry changed, read at
32 px (the 8×8 digits upsampled bilinearly, as the bundled demo model is). Weights go to
`engines/suite/<key>.safetensors` (git-ignored) with a JSON summary beside them;
`load_suite_model` trains a missing model on first use, so a fresh checkout regenerates them.

Splits, fixed (see `suite_splits`): the digits **test** split of `mpdeploy.data.digits` (360
images, untouched here and by training); its 1,437-image train split is cut once more by a
stratified `train_test_split(test_size=300, random_state=1)` into **fit** (1,137 images: training,
calibration, recovery) and **val** (300 images: choosing defaults). Only fit is trained on; val
top-1 is reported after the last epoch (no early stopping, no selection on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(SCRIPTS))

from train_demo import lr_at, normalize, random_affine, to_unit_tensor  # noqa: E402

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)
from mpdeploy.data.digits import load_digits_split  # noqa: E402
from mpdeploy.models.demo import DEMO_IMG_SIZE, DEMO_MEAN, DEMO_STD  # noqa: E402

CACHE_DIR = REPO_ROOT / "engines" / "suite"
VAL_SIZE = 300
VAL_RANDOM_STATE = 1


@dataclasses.dataclass(frozen=True)
class SuiteModel:
    key: str
    family: str
    timm_name: str
    kwargs: dict[str, Any]
    epochs: int
    lr: float
    drop_path: float = 0.0
    batch_size: int = 64
    weight_decay: float = 0.05


# Patch 8 (16 tokens) keeps the ViTs affordable on 2 shared CPU cores; widths are cut for the same
# reason (the stock atto/resnet widths cost 4-10x more per epoch at no gain on digits).
_VIT = dict(img_size=DEMO_IMG_SIZE, patch_size=8, mlp_ratio=4.0, global_pool="token")
# Half the stock ResNet widths and a deep 3×3 stem of width 8: the stock 64-channel 7×7 stem alone
# would be too large a share of the MACs for any structured pruner to reach a 70 % reduction.
_RESNET = dict(channels=(32, 64, 128, 256), stem_type="deep", stem_width=8)
SUITE: dict[str, SuiteModel] = {
    m.key: m
    for m in (
        SuiteModel(
            "vit_t",
            "vit",
            "vit_tiny_patch16_224",
            dict(_VIT, embed_dim=48, depth=4, num_heads=2),
            epochs=100,
            lr=2e-3,
        ),
        SuiteModel(
            "vit_s",
            "vit",
            "vit_small_patch16_224",
            dict(_VIT, embed_dim=96, depth=4, num_heads=4),
            epochs=30,
            lr=2e-3,
            drop_path=0.05,
        ),
        SuiteModel(
            "convnextv2_n",
            "convnext",
            "convnextv2_atto",
            dict(depths=(1, 1, 3, 1), dims=(32, 64, 128, 256)),
            epochs=10,
            lr=2e-3,
        ),
        SuiteModel(
            "resnet18_n",
            "resnet",
            "resnet18",
            _RESNET,
            epochs=10,
            lr=2e-3,
        ),
        SuiteModel(
            "resnet26_n",
            "resnet",
            "resnet26",
            _RESNET,
            epochs=10,
            lr=2e-3,
        ),
    )
}


def data_config() -> dict[str, Any]:
    """The timm data config every digits model of the suite is read with (as the demo's)."""
    return {
        "input_size": (3, DEMO_IMG_SIZE, DEMO_IMG_SIZE),
        "interpolation": "bilinear",
        "mean": DEMO_MEAN,
        "std": DEMO_STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


@functools.lru_cache(maxsize=1)
def suite_splits() -> dict[str, np.ndarray]:
    """Positions into `load_digits_split("train")` of fit and val (sorted); test is its own split."""
    from sklearn.model_selection import train_test_split

    _, labels = load_digits_split("train")
    fit, val = train_test_split(
        np.arange(len(labels)),
        test_size=VAL_SIZE,
        stratify=labels,
        random_state=VAL_RANDOM_STATE,
    )
    return {"fit": np.sort(fit), "val": np.sort(val)}


def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and labels of "fit", "val" or "test"."""
    if split == "test":
        return load_digits_split("test")
    images, labels = load_digits_split("train")
    index = suite_splits()[split]
    return images[index], labels[index]


def weights_path(key: str, cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / f"{key}.safetensors"


def build_model(spec: SuiteModel, num_classes: int = 10, **extra: Any) -> torch.nn.Module:
    import timm

    return timm.create_model(
        spec.timm_name, pretrained=False, num_classes=num_classes, **spec.kwargs, **extra
    )


def adamw(model: torch.nn.Module, spec: SuiteModel) -> torch.optim.AdamW:
    """The suite's optimiser: AdamW at `spec.lr`, weight decay on the ≥ 2-D weights but
    pos_embed."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay}],
        lr=spec.lr,
        weight_decay=0.0,
    )


TRAINING_PREFIX = "train-seed-"  # + the seed: the folder of another training (weights, results)


def training_dir(seed: int) -> Path:
    """Where training seed `seed` keeps its weights: the suite's own (seed 0) in CACHE_DIR, every
    other training of the same recipe in a folder of its own beside them."""
    return CACHE_DIR if seed == 0 else CACHE_DIR / f"{TRAINING_PREFIX}{seed}"


def load_suite_model(
    key: str, cache_dir: Path = CACHE_DIR, threads: int = 1, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained suite model `key` (eval mode) and its data config; trains it (with `seed`)
    when missing."""
    from safetensors.torch import load_file

    spec = SUITE[key]
    path = weights_path(key, cache_dir)
    if not path.is_file():
        train(spec, cache_dir, seed=seed, threads=threads)
    model = build_model(spec)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), data_config()


@torch.no_grad()
def top1(model: torch.nn.Module, unit: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(normalize(chunk)) for chunk in unit.split(256)])
    return float((logits.argmax(1) == labels).float().mean())


def train(spec: SuiteModel, cache_dir: Path = CACHE_DIR, seed: int = 0, threads: int = 1) -> dict:
    """The recipe of scripts/train_demo.py (AdamW, warm-up + cosine, affine aug) on fit only."""
    from mpdeploy.fileio import atomic_path, sha256_file, write_json

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    fit_images, fit_labels = split_arrays("fit")
    val_images, val_labels = split_arrays("val")
    x_fit, y_fit = to_unit_tensor(fit_images), torch.from_numpy(fit_labels)
    x_val, y_val = to_unit_tensor(val_images), torch.from_numpy(val_labels)

    model = build_model(spec, drop_path_rate=spec.drop_path)
    optimizer = adamw(model, spec)
    steps_per_epoch = math.ceil(len(y_fit) / spec.batch_size)
    total, warmup = spec.epochs * steps_per_epoch, max(1, spec.epochs // 20) * steps_per_epoch
    step, start = 0, time.perf_counter()
    for epoch in range(spec.epochs):
        model.train()
        loss_sum = 0.0
        for index in torch.randperm(len(y_fit), generator=generator).split(spec.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, spec.lr)
            logits = model(normalize(random_affine(x_fit[index], generator)))
            loss = F.cross_entropy(logits, y_fit[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(index)
        print(
            f"{spec.key} epoch {epoch + 1:3d}/{spec.epochs} loss {loss_sum / len(y_fit):.4f} "
            f"{time.perf_counter() - start:6.1f}s",
            flush=True,
        )
    seconds = time.perf_counter() - start
    val_top1 = top1(model, x_val, y_val)
    print(
        f"{spec.key}: val top-1 {val_top1:.4f} ({len(y_val)} images), {seconds:.0f} s", flush=True
    )

    from safetensors.torch import save_file

    path = weights_path(spec.key, cache_dir)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "architecture": spec.timm_name})
    summary = {
        "key": spec.key,
        "family": spec.family,
        "timm_name": spec.timm_name,
        "kwargs": spec.kwargs,
        "params": sum(v.numel() for v in model.parameters()),
        "recipe": {
            **{k: v for k, v in dataclasses.asdict(spec).items() if k not in ("key", "kwargs")},
            "seed": seed,
            "threads": threads,
            "schedule": "AdamW, linear warm-up (epochs // 20, ≥ 1), cosine to 0",
            "loss": "cross-entropy, label smoothing 0.1",
            "augmentation": "random affine as scripts/train_demo.py",
        },
        "fit_images": len(y_fit),
        "val_images": len(y_val),
        "val_top1": round(val_top1, 4),
        "train_seconds": round(seconds, 1),
        "sha256": sha256_file(path),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    write_json(path.with_suffix(".json"), summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--force", action="store_true", help="retrain even if weights exist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"default: {CACHE_DIR} for seed 0, {CACHE_DIR}/train-seed-N for seed N",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed (the suite's models are seed 0; other seeds give other trainings of "
        "the same recipes, which `accuracy_suite.py --train-seed N` measures)",
    )
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = training_dir(args.seed)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key in args.models:
        if weights_path(key, args.cache_dir).is_file() and not args.force:
            print(f"{key}: cached at {weights_path(key, args.cache_dir)}")
            continue
        summary = train(SUITE[key], args.cache_dir, seed=args.seed, threads=args.threads)
        print(json.dumps({k: summary[k] for k in ("key", "params", "val_top1", "train_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
