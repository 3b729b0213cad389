"""A second trained task for the accuracy suite's replication: which photo is this patch from?

The digits models (scripts/train_suite.py) chose every default of issue 11. Digits are 8×8 strokes
upsampled to 32 px; the models our users prune read natural images. This script trains the same
five architectures (the suite's `SUITE` specs: ViT tiny/small, ConvNeXtV2, ResNet18/26 at 32 px)
on a task with natural-image statistics that ships with the environment: 21 classes, one per real
photo (the 14 calibration photos of efficientnet-lite0's suite cells and the 7 of its val/test
splits, gray ones as RGB), each image a seeded random patch (1–5 % of the photo's area, aspect
3:4–4:3, random flip) resized to 32×32. Fit, calibration, val and test patches come from
different seeds; val and test are read together (no choice is made here: the defaults stay as
chosen on the digits val split). The pruners are compared at 30/50/70 % fewer MACs and 2:4, one
prune draw per run (`--seed`), every one with the suite's own `prune` (`lsq+bn`) and Torch-Pruning
at the same counted MACs, zero-shot and, with `--recover-seeds`, after one epoch of the default
recovery on the fit patches.

    python scripts/photo_task.py --out docs/photo-task.jsonl        # trains missing models first
    python scripts/photo_task.py --models vit_t --methods mp_fisher_split magnitude --out F
    python scripts/photo_task.py --table docs/photo-task.jsonl           # the table in docs/accuracy.md
    python scripts/photo_task.py --train-seed 1 --out F                  # another training's models

Weights go to engines/suite/photo/<key>.safetensors (git-ignored), one JSON line per cell to
--out (appended). On 2 cores: 26–57 s to train each model, 1–10 s per zero-shot cell
(Torch-Pruning, which bisects its ratio, the slowest), 7–11 s per recovery epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import accuracy_suite as suite  # noqa: E402
import train_suite  # noqa: E402
from lite0_calibration import WIDE_PHOTOS  # noqa: E402

WORK = train_suite.CACHE_DIR / "photo"
SIZE = 32
AREA = (0.01, 0.05)
SPLIT_SEEDS = {"fit": 10, "calib": 11, "val": 12, "test": 13}
SPLIT_SIZES = {"fit": 4200, "calib": 128, "val": 630, "test": 630}
EPOCHS = {"vit_t": 40, "vit_s": 20, "convnextv2_n": 10, "resnet18_n": 10, "resnet26_n": 10}
METHODS = (
    "mp_fisher_split",
    "mp",
    "magnitude",
    "taylor",
    "mp_fisher_taylor",
    "tp_magnitude",
    "tp_taylor",
)
NM_METHODS = ("nm_obs_shrink", "nm_magnitude", "nm_cast")
TARGETS = (0.3, 0.5, 0.7)


HELD_OUT_PHOTOS = tuple(name for split in ("val", "test") for name in suite.PHOTO_SPLITS[split])
CLASSES = len(WIDE_PHOTOS) + len(HELD_OUT_PHOTOS)  # one per photo of `photos()`


@functools.lru_cache(maxsize=1)
def photos() -> tuple:
    import skimage
    from lite0_calibration import photo_paths
    from PIL import Image

    paths = list(photo_paths())
    root = Path(skimage.__file__).parent / "data"
    paths += [root / name for name in HELD_OUT_PHOTOS]
    return tuple(Image.open(p).convert("RGB") for p in paths)


def patches(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) patches and their photo index, round-robin over the photos."""
    from PIL import Image

    rng = np.random.default_rng(SPLIT_SEEDS[split])
    sources = photos()
    images, labels = [], []
    for i in range(SPLIT_SIZES[split]):
        label = i % len(sources)
        photo = sources[label]
        w, h = photo.size
        area = rng.uniform(*AREA) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
        ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        if rng.integers(2):
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(np.asarray(crop, dtype=np.uint8))
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def statistics() -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the fit patches (the models' normalisation)."""
    x = unit(patches("fit")[0])
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


def data_config(mean: list[float], std: list[float]) -> dict:
    return {
        "input_size": (3, SIZE, SIZE),
        "interpolation": "bilinear",
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def normalised(images: np.ndarray, config: dict) -> torch.Tensor:
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return (unit(images) - mean) / std


def train(key: str, config: dict, seed: int = 0) -> dict:
    """The suite's recipe (AdamW, warm-up + cosine, label smoothing 0.1) with random flips."""
    from safetensors.torch import save_file

    spec = train_suite.SUITE[key]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = patches("fit")
    x, y = normalised(images, config), torch.from_numpy(labels)
    model = train_suite.build_model(spec, CLASSES, drop_path_rate=spec.drop_path)
    optimizer = train_suite.adamw(model, spec)
    epochs = EPOCHS[key]
    per_epoch = math.ceil(len(y) / spec.batch_size)
    total, warmup = epochs * per_epoch, max(1, epochs // 20) * per_epoch
    step, start = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for index in torch.randperm(len(y), generator=generator).split(spec.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = train_suite.lr_at(step, total, warmup, spec.lr)
            batch = x[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
            loss = F.cross_entropy(model(batch), y[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        print(f"{key} epoch {epoch + 1}/{epochs} {time.perf_counter() - start:.0f}s", flush=True)
    path = weights_path(key, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return {"classes": CLASSES, "epochs": epochs, "seconds": round(time.perf_counter() - start)}


def weights_path(key: str, seed: int = 0) -> Path:
    """Training 0's weights in WORK, every other training's in a folder of its own beside them."""
    folder = WORK / f"{train_suite.TRAINING_PREFIX}{seed}" if seed else WORK
    return folder / f"{key}.safetensors"


def load(key: str, config: dict, seed: int = 0) -> suite.SuiteModel:
    from safetensors.torch import load_file

    spec = train_suite.SUITE[key]
    path = weights_path(key, seed)
    if not path.is_file():
        print(key, train(key, config, seed), flush=True)
    state = load_file(str(path))
    model = train_suite.build_model(spec, CLASSES)
    model.load_state_dict(state)
    return suite.SuiteModel(key, model.eval(), config, "top1")


def table(rows: list[dict]) -> str:
    """Markdown: per model, target and epoch count, val / test top-1 (%) of the default, of the
    best other criterion of ours, of magnitude and of Torch-Pruning's better importance; each a
    mean over the rows present (prune draws zero-shot, recovery seeds after an epoch)."""
    trainings = {row.get("train_seed", 0) for row in rows}
    if len(trainings) > 1:
        raise ValueError(f"rows of {len(trainings)} trainings: table one training at a time")
    names = suite.default_names()
    default = {"structured": names["method"], "nm": f"nm_{names['nm_method']}"}
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        when = row.get("recover_epochs", 0)
        cells.setdefault((row["model"], str(row["target"]), when), {}).setdefault(
            row["method"], []
        ).append(row)

    def mean(group: list[dict]) -> tuple[float, float]:
        return tuple(100 * sum(r[s] for r in group) / len(group) for s in ("val", "test"))

    def show(name: str, group: list[dict] | None) -> str:
        if not group:
            return "–"
        val, test = mean(group)
        return f"`{name}` {val:.1f} / {test:.1f}" if name else f"{val:.1f} / {test:.1f}"

    lines = [
        "| model | target | when | dense | default | best other of ours | magnitude "
        "| Torch-Pruning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, target, when), methods in sorted(cells.items()):
        kind = "nm" if target == "2:4" else "structured"
        first = next(iter(methods.values()))[0]
        ours = {m: g for m, g in methods.items() if m != default[kind] and not m.startswith("tp_")}
        ours.pop("nm_magnitude" if kind == "nm" else "magnitude", None)
        best = max(ours, key=lambda m: sum(mean(ours[m])), default=None)
        tp = {m: g for m, g in methods.items() if m.startswith("tp_")}
        tp_best = max(tp, key=lambda m: sum(mean(tp[m])), default=None)
        magnitude = methods.get("nm_magnitude" if kind == "nm" else "magnitude")
        lines.append(
            f"| {model} | {target if kind == 'nm' else f'{float(target):.0%}'} "
            f"| {f'+ {when} ep' if when else 'zero-shot'} "
            f"| {100 * first['dense_val']:.1f} / {100 * first['dense_test']:.1f} "
            f"| {show('', methods.get(default[kind]))} "
            f"| {show(best, ours.get(best)) if best else '–'} | {show('', magnitude)} "
            f"| {show(tp_best, tp.get(tp_best)) if tp_best else '–'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(train_suite.SUITE))
    parser.add_argument("--methods", nargs="+", default=list(METHODS + NM_METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--seed", type=int, default=0, help="prune draw")
    parser.add_argument(
        "--train-seed", type=int, default=0, help="which training of the models (0: the first)"
    )
    parser.add_argument(
        "--recover-seeds",
        nargs="+",
        type=int,
        default=[],
        help="after the zero-shot record, one epoch of recovery on the fit patches per seed",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON lines, appended")
    parser.add_argument("--table", type=Path, help="print the Markdown table of these JSON lines")
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line]))
        return 0
    if args.out is None:
        parser.error("--out is required unless --table is given")
    torch.set_num_threads(args.threads)
    suite.SETTINGS = dataclasses.replace(suite.SETTINGS, threads=args.threads)
    config = data_config(*statistics())
    held = {s: patches(s) for s in ("val", "test")}
    calib = normalised(patches("calib")[0], config)
    for key in args.models:
        model = load(key, config, args.train_seed)
        data = {
            s: suite.HeldOut(normalised(x, config), torch.from_numpy(y), f"photo patches {s}")
            for s, (x, y) in held.items()
        }
        dense = {s: suite.accuracy(model.model, d) for s, d in data.items()}
        for method in args.methods:
            targets = ["2:4"] if method.startswith("nm_") else args.targets
            for target in targets:
                pruned = suite.prune(
                    key, method, "lsq+bn", target, args.seed, images=calib, model=model
                )
                record = {
                    "task": "photo patches, 21 classes",
                    "model": key,
                    "method": method,
                    "compensate": "none" if method in suite.TP_METHODS else "lsq+bn",
                    "target": target,
                    "seed": args.seed,
                    "train_seed": args.train_seed,
                    "mac_reduction": round(pruned.mac_reduction, 4),
                    "prune_seconds": round(pruned.seconds, 1),
                    **{f"dense_{s}": dense[s] for s in data},
                    **{s: suite.accuracy(pruned.model, d) for s, d in data.items()},
                    "eval_images": {s: int(len(d.labels)) for s, d in data.items()},
                    "calib_images": int(calib.shape[0]),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                records = [record] + [
                    {**record, **recovered(model, pruned, seed, data)}
                    for seed in args.recover_seeds
                ]
                for record in records:
                    print(json.dumps(record), flush=True)
                    with args.out.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
    return 0


def fit_folder() -> Path:
    """The fit patches as a labelled image folder (what recovery's `--train` reads), written once."""
    from PIL import Image

    root = WORK / "fit"
    if (root / ".complete").is_file():
        return root
    images, labels = patches("fit")
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / f"{label:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"{label:02d}" / f"fit_{index:04d}.png")
    (root / ".complete").write_text("ok\n")
    return root


def recovered(model: suite.SuiteModel, pruned: suite.Pruned, seed: int, data: dict) -> dict:
    """One epoch of the default recovery (KD + CE on the labelled fit patches, random flips),
    scored on val and test."""
    import copy

    from mpdeploy.prune.recover import RecoverConfig, recover

    start = time.perf_counter()
    student = copy.deepcopy(pruned.model)
    result = recover(
        student,
        model.model,
        fit_folder(),
        model.data_config,
        RecoverConfig(epochs=1, seed=seed, progress=False, eval_images=64),
        masks=pruned.masks,
    )
    return {
        "recover_epochs": 1,
        "recover_seed": seed,
        "recover_steps": result.record["steps"],
        "recover_seconds": round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{s: suite.accuracy(result.model, d) for s, d in data.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
