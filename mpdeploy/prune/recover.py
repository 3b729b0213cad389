"""Short recovery of a pruned (and possibly N:M-sparse) model by distillation from the dense teacher.

The MP paper's distillation recipe (docs/pruning.md): loss 0.5·CE(label smoothing 0.1) +
0.5·τ²·KL(teacher/τ ‖ student/τ) with τ = 2 on labelled data; on unlabelled images (a folder
without class sub-folders, or the calibration batch itself) the loss is the KL term alone, τ²·KL,
so no labels are ever needed; AdamW with no weight decay on biases, norms, pos_embed and
cls_token; linear warm-up (10 % of the steps) then cosine decay to 1 % of the peak; gradient
clipping. The architecture is frozen (widths do not change), and N:M masks, when given, are
re-applied after every optimiser step so momentum and weight decay cannot refill them. Runs in one
process, or under `torchrun` with DistributedDataParallel.

One epoch must count (issue 11: within 3 pp of dense after 1 epoch at 70 % MAC reduction). Chosen on
the accuracy suite's val split (docs/accuracy.md, "Recovery recipe" and "More steps per epoch";
scripts/recover_sweep.py), one recipe for ViT, ConvNeXtV2 and ResNet: a batch sized so an epoch has
≥ 128 optimiser steps (8 on 1,137 images: 142 steps; 17 at batch 64 before 2026-11-27, 71 at
batch 16 until 2026-11-29), peak lr 3e-4 (was 1e-4), no random-resized-crop jitter (`crop_scale`
(1, 1); was (0.6, 1)), and BatchNorm statistics frozen when a batch holds fewer than 16 images
(the batch statistics of 8 images cost resnet26_n what the extra steps gave the ViTs), after
re-estimating them on the folder (a cut without the `bn` compensation leaves them stale, and
frozen they stayed so: Torch-Pruning's ResNets lost 4–10 pp after an epoch; docs/accuracy.md,
"Stale BatchNorm statistics"). Measured and
not taken: KD only (α = 1), τ = 1 or 4, lr 1e-3 or 5e-4, weight EMA (`ema`, 0.99 / 0.95), a
feature-matching term on the block outputs — within seed noise or worse.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.data.calibration import PhotoCropStream
from mpdeploy.errors import UserError

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
    epochs: int = 1
    seed: int = 0
    lr: float = 3e-4
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    warmup_fraction: float = 0.1  # of all optimiser steps
    weight_decay: float = 0.05
    # None: the largest of 64, 32, 16, 8 that still gives an epoch `min_steps_per_epoch` optimiser
    # steps (1,137 images → 8, 142 steps; 16,384 → 64; 128 calibration images → 8); an int is
    # used as given
    batch_size: int | None = None
    min_steps_per_epoch: int = 128
    alpha: float = 0.5  # weight of the KD term; 1 − alpha on cross-entropy
    tau: float = 2.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    hflip: float | None = None  # None: 0.5 for image folders, 0 for the demo digits
    # random-resized-crop area range on image folders: (1, 1) = the whole image, no crop jitter
    crop_scale: tuple[float, float] = (1.0, 1.0)
    ema: float | None = None  # decay of a moving average of the weights, kept at the end
    max_steps: int | None = None  # stop early (tests, smoke runs)
    eval_images: int = 512  # seeded subset of the training images scored before and after
    num_workers: int = 0
    progress: bool = True
    # BatchNorm statistics during training: frozen (eval mode; scale and shift still train) or
    # updated. None: frozen when training on the calibration images (a few hundred crops of a
    # few photos would replace the trained statistics by theirs, which alone took a dense
    # efficientnet-lite0 to 34 % agreement with itself: prune/compensate.py, `bn`), and when a
    # batch holds fewer than `min_norm_batch` images (their batch statistics are too noisy)
    freeze_norms: bool | None = None
    min_norm_batch: int = 16
    # BatchNorm running statistics re-estimated on up to `norm_images` training images before
    # training (a cumulative average over batches of 64, no gradient). None: when they are then
    # frozen by the `min_norm_batch` rule on an image folder, so a student pruned without the
    # `bn` compensation does not train for a whole epoch on statistics its cut made stale (the
    # batch statistics of 16 or more images used to repair them as training went); never on the
    # calibration images, where only the `bn` compensation's shift relative to the dense
    # network is right
    reestimate_norms: bool | None = None
    norm_images: int = 1024


@dataclasses.dataclass(frozen=True)
class RecoverResult:
    model: nn.Module
    record: dict[str, Any]
    headline: dict[str, Any]


def recover(
    student: nn.Module,
    teacher: nn.Module,
    train: str | os.PathLike | torch.Tensor,
    data_config: Mapping[str, Any],
    config: RecoverConfig,
    sparsity: tuple[int, int] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> RecoverResult:
    """Distil `teacher` into `student` (in place) on `train`: "demo", an ImageFolder layout
    (labelled), a folder of images without class sub-folders (unlabelled: KL only), or a tensor
    of preprocessed images (the calibration batch: KL only, no augmentation).

    `masks` (bool, keyed by parameter name) are kept exactly; without them, a given `sparsity`
    pattern freezes the current zeros of every ≥2-D weight instead.
    """
    if config.epochs < 1:
        raise UserError(f"recovery needs at least one epoch (got {config.epochs})")
    start = time.perf_counter()
    world, rank, local_rank = _distributed_env()
    device = _device(student, local_rank)
    torch.manual_seed(config.seed + rank)
    # timm's train transforms draw from Python's and numpy's global generators
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    student.to(device)
    teacher.to(device).eval()
    if masks is None and sparsity is not None:
        masks = {n: p.detach() != 0 for n, p in student.named_parameters() if p.ndim >= 2}
    masks = _checked_masks(student, masks, device)
    _apply_masks(student, masks)

    train_set, eval_set, source = _datasets(train, data_config, config, student, teacher, device)
    batch_size = train_batch_size(len(train_set), config, world)
    top1_before = top1(student, eval_set, EVAL_BATCH, device)
    on_calibration = torch.is_tensor(train) or isinstance(train, PhotoCropStream)
    freeze = config.freeze_norms
    if freeze is None:
        freeze = on_calibration or batch_size < config.min_norm_batch
    reestimate = config.reestimate_norms
    if reestimate is None:
        reestimate = bool(freeze) and config.freeze_norms is None and not on_calibration
    norms_reestimated = (
        reestimate_norms(student, train_set, config.norm_images, config.seed, device)
        if reestimate
        else 0
    )
    losses = _train(
        student, teacher, train_set, config, masks, device, world, rank, freeze, batch_size
    )
    top1_after = top1(student, eval_set, EVAL_BATCH, device)

    steps = sum(len(e) for e in losses)
    epoch_means = [float(np.mean(e)) if e else None for e in losses]
    labelled = source["labelled"]
    record = {
        "train": source["train"],
        "data": source["data"],
        "train_images": len(train_set),
        # a PhotoCropStream: how many calibration photos, how many fresh crops of them per epoch
        **{k: source[k] for k in ("photos", "crops_per_epoch") if k in source},
        "classes": source["classes"],
        "epochs": config.epochs,
        "steps": steps,
        "batch_size": batch_size,
        "world_size": world,
        "config": dataclasses.asdict(config),
        "loss": (
            "(1-alpha)*CE(label_smoothing) + alpha*tau^2*KL(teacher/tau || student/tau)"
            if labelled
            else "tau^2*KL(teacher/tau || student/tau) (no labels)"
        ),
        "loss_per_epoch": epoch_means,
        "loss_first_step": losses[0][0] if steps else None,
        "loss_last_step": losses[-1][-1] if steps and losses[-1] else None,
        "masked_tensors": len(masks),
        "norms_frozen": bool(freeze),
        "norms_reestimated": norms_reestimated,  # BatchNorm layers, before training
        "sparsity": f"{sparsity[0]}:{sparsity[1]}" if sparsity else None,
        "top1_subset": {
            "images": len(eval_set),
            "against": "labels" if labelled else "the dense model's top-1 (agreement)",
            "before": top1_before,
            "after": top1_after,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }
    headline = {
        "recover_data": source["data"],  # which images: labelled, unlabelled or calibration
        "recover_epochs": config.epochs,
        "recover_steps": steps,
        "recover_loss_last_epoch": epoch_means[-1],
        "recover_top1_train_subset_before": top1_before,
        "recover_top1_train_subset_after": top1_after,
    }
    return RecoverResult(student.eval(), record, headline)


# --- data ---------------------------------------------------------------------------------------

UNLABELLED = -1  # the label of an image without one: the loss is then KL only
EVAL_BATCH = 64


def train_batch_size(images: int, config: RecoverConfig, world: int = 1) -> int:
    """The per-process batch: `config.batch_size`, or the largest of 64, 32, 16, 8 that gives an
    epoch at least `config.min_steps_per_epoch` steps (8 when none does).

    One epoch of a few thousand images at batch 64 is ~18 optimiser steps, too few to recover
    (docs/accuracy.md, "Recovery recipe", "More steps per epoch"); a folder of 8,192 images or more
    keeps the efficient batch of 64.
    """
    if config.batch_size is not None:
        return config.batch_size
    batch = 64
    while batch > 8 and images // (batch * world) < config.min_steps_per_epoch:
        batch //= 2
    return batch


def _datasets(train, data_config, config, student, teacher, device):
    """(train set, eval subset, description) for every kind of `train`."""
    if isinstance(train, PhotoCropStream):  # fresh crops of the calibration photos every epoch
        eval_idx = _eval_subset(len(train), config.eval_images, config.seed)
        eval_set = TensorImages(torch.stack([train[int(i)][0] for i in eval_idx]))
        photos, classes, labelled, train_set = len(train.photos), [], False, train
        source = {
            "train": "calibration",
            "data": f"fresh random crops of the {photos} calibration photos each epoch "
            f"({len(train)} per epoch, no labels)",
            "photos": photos,
            "crops_per_epoch": len(train),
        }
    elif torch.is_tensor(train):
        images, classes = train.detach().float().cpu(), []
        if images.shape[0] == 0:
            raise UserError("recovery on the calibration images needs at least one image")
        train_set = TensorImages(images)
        eval_idx = _eval_subset(len(images), config.eval_images, config.seed)
        eval_set = TensorImages(images[torch.as_tensor(eval_idx)])
        source = {"train": "calibration", "data": f"calibration images ({len(images)}, no labels)"}
        labelled = False
    else:
        images, labels, classes = load_train_set(train)
        labelled = bool(classes)
        num_classes = int(getattr(student, "num_classes", 0) or 0)
        if num_classes and len(classes) > num_classes:
            raise UserError(f"{train} has {len(classes)} classes but the model has {num_classes}")
        if labelled and num_classes and len(classes) < num_classes:
            log.warning(
                "%s has %d classes, the model %d: folder i is class i",
                train,
                len(classes),
                num_classes,
            )
        hflip = config.hflip if config.hflip is not None else (0.0 if str(train) == "demo" else 0.5)
        transform = train_transform(data_config, hflip, config.crop_scale)
        train_set = LabelledImages(images, labels, transform)
        eval_idx = _eval_subset(len(images), config.eval_images, config.seed)
        eval_set = LabelledImages(
            [images[i] for i in eval_idx], labels[eval_idx], _eval_transform(data_config)
        )
        kind = "labelled image folder" if labelled else "unlabelled image folder (no labels)"
        source = {"train": str(train), "data": "digits train split" if train == "demo" else kind}
    if not labelled:  # score agreement with the teacher instead of labels
        eval_set = _with_teacher_labels(eval_set, teacher, EVAL_BATCH, device)
    source.update(labelled=labelled, classes=len(classes) if labelled else None)
    return train_set, eval_set, source


class TensorImages(torch.utils.data.Dataset):
    """Preprocessed image tensors without labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = UNLABELLED if self.labels is None else int(self.labels[index])
        return self.images[index], label


def _with_teacher_labels(dataset, teacher, batch_size, device) -> TensorImages:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    images = torch.cat([batch for batch, _ in loader])
    teacher.eval()
    with torch.no_grad():
        labels = torch.cat(
            [teacher(b.to(device)).argmax(1).cpu() for b in images.split(batch_size)]
        )
    return TensorImages(images, labels)


class LabelledImages(torch.utils.data.Dataset):
    """PIL images or image paths with integer labels, transformed on access."""

    def __init__(self, images: list[Any], labels: np.ndarray, transform: Any):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        item = self.images[index]
        if isinstance(item, (str, Path)):
            with Image.open(item) as img:
                item = img.convert("RGB")
        return self.transform(item), int(self.labels[index])


def load_train_set(train: str | os.PathLike) -> tuple[list[Any], np.ndarray, list[str]]:
    """("demo" → the digits train split), an ImageFolder (sorted sub-folder names → classes), or a
    folder of images without class sub-folders (labels UNLABELLED, classes [])."""
    if str(train) == "demo":
        from mpdeploy.data.digits import NUM_CLASSES, digits_pil_images, load_digits_split

        _, labels = load_digits_split("train")
        return digits_pil_images("train"), labels, [str(i) for i in range(NUM_CLASSES)]
    from mpdeploy.data.calibration import IMAGE_SUFFIXES

    root = Path(train)
    if not root.is_dir():
        raise UserError(f"--train must be an image folder or 'demo': {root} is not a folder")

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    top_level = images_in(root, recursive=False)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and images_in(p, True))
    if top_level or not classes:  # images not sorted into class folders: no labels
        paths = images_in(root, recursive=True)
        if not paths:
            raise UserError(f"no images in {root} (--train needs image files)")
        return paths, np.full(len(paths), UNLABELLED, dtype=np.int64), []
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = images_in(root / name, recursive=True)
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), classes


def check_train_folder(root: str | os.PathLike) -> None:
    """A --train folder must hold at least one image (checked before a build starts)."""
    from mpdeploy.data.calibration import IMAGE_SUFFIXES

    found = (p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not any(p.is_file() for p in found):
        raise UserError(f"no images in {root} (--train needs image files)")


def train_transform(
    data_config: Mapping[str, Any], hflip: float, scale: tuple[float, float] = (0.6, 1.0)
):
    """timm's training transform at the model's size and normalisation, lightly augmented."""
    import timm

    return timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=None,
        auto_augment=None,
        re_prob=0.0,
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )


def _eval_transform(data_config: Mapping[str, Any]):
    from mpdeploy.data.calibration import eval_transform

    return eval_transform(dict(data_config))


def _eval_subset(total: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(total)[: min(size, total)])


# --- training -----------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: RecoverConfig,
) -> torch.Tensor:
    """(1 − α)·CE + α·τ²·KL on labelled batches; τ²·KL alone when the batch has no labels."""
    kl = F.kl_div(
        F.log_softmax(student_logits / config.tau, dim=1),
        F.log_softmax(teacher_logits / config.tau, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    if bool((labels == UNLABELLED).all()):
        return config.tau**2 * kl
    ce = F.cross_entropy(student_logits, labels, label_smoothing=config.label_smoothing)
    return (1.0 - config.alpha) * ce + config.alpha * config.tau**2 * kl


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on ≥2-D weights only: not on biases, norms, position embeddings or tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(total_steps: int, config: RecoverConfig):
    warmup = max(1, int(round(config.warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return factor


def _train(
    student: nn.Module,
    teacher: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: RecoverConfig,
    masks: dict[str, torch.Tensor],
    device: torch.device,
    world: int,
    rank: int,
    freeze_norms: bool = False,
    batch_size: int = 64,
) -> list[list[float]]:
    from tqdm.auto import tqdm

    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset, world, rank, shuffle=True, seed=config.seed
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=len(dataset) >= batch_size * world,
        generator=torch.Generator().manual_seed(config.seed),
    )
    total = config.epochs * len(loader)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(param_groups(student, config.weight_decay), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, config))
    model = _wrap_ddp(student, device) if world > 1 else student
    params = dict(student.named_parameters())
    losses: list[list[float]] = []
    bar = tqdm(
        total=total,
        desc="recover",
        unit="step",
        disable=None if config.progress and rank == 0 else True,
    )
    ema = _Ema(student, config.ema) if config.ema else None
    step = 0
    model.train()
    if freeze_norms:  # running statistics stay; BatchNorm scale and shift still train
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    for epoch in range(config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        if isinstance(dataset, PhotoCropStream):
            dataset.set_epoch(epoch)
        losses.append([])
        for images, labels in loader:
            if step >= total:
                break
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = kd_loss(model(images), teacher_logits, labels, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            _apply_masks(student, masks, params)
            if ema is not None:
                ema.update(student)
            losses[-1].append(_mean_across_ranks(loss.detach(), world))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1][-1]:.4f}", epoch=epoch + 1)
    bar.close()
    if ema is not None:
        ema.copy_to(student)
        _apply_masks(student, masks, params)
    student.eval()
    return losses


def reestimate_norms(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    images: int,
    seed: int,
    device: torch.device,
) -> int:
    """Replace the running statistics of every BatchNorm of `model` by their cumulative average
    over a seeded subset of up to `images` items of `dataset` (batches of EVAL_BATCH, no
    gradient; every other module in eval mode). Returns how many BatchNorm layers it set; every
    process of a distributed run reads the same images, so they agree."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms or len(dataset) == 0:
        return 0
    subset = _eval_subset(len(dataset), images, seed)
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    try:
        with torch.no_grad():
            for start in range(0, len(subset), EVAL_BATCH):
                batch = [dataset[int(i)][0] for i in subset[start : start + EVAL_BATCH]]
                if len(batch) < 2 and start:  # one image has no batch variance: done
                    break
                model(torch.stack(batch).to(device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return len(norms)


class _Ema:
    """Exponential moving average of every parameter and buffer (BatchNorm statistics too)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value, 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)


def top1(model: nn.Module, dataset, batch_size: int, device: torch.device) -> float:
    if len(dataset) == 0:
        return float("nan")
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    hits = 0
    with torch.no_grad():
        for images, labels in loader:
            hits += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    return hits / len(dataset)


# --- masks and distribution ---------------------------------------------------------------------


def _checked_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    if not masks:
        return {}
    params = dict(model.named_parameters())
    checked = {}
    for name, mask in masks.items():
        if name not in params:
            raise UserError(f"mask for {name!r}, which is not a parameter of the model")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise UserError(
                f"mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(params[name].shape)}"
            )
        checked[name] = mask.to(device=device, dtype=torch.bool)
    return checked


def _apply_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    params: Mapping[str, nn.Parameter] | None = None,
) -> None:
    params = params if params is not None else dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def _distributed_env() -> tuple[int, int, int]:
    """(world size, rank, local rank), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))


def _device(model: nn.Module, local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("WORLD_SIZE", "1") != "1":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return next(model.parameters()).device


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _mean_across_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)
