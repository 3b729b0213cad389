"""The calibration batch: a fixed, seeded set of real images, preprocessed by the model's own timm config."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mpdeploy.errors import UserError
from mpdeploy.fileio import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
CALIBRATION_JSON = "calibration.json"
CALIBRATION_TENSORS = "calibration.safetensors"
# Seeded crops of 13 photos stop being meaningfully different long before this many.
BUILTIN_PHOTO_CROPS = 1024
DEPENDENCY_PHOTOS = (  # (label, package, path inside the installed package)
    ("sklearn:china.jpg", "sklearn", "datasets/images/china.jpg"),
    ("sklearn:flower.jpg", "sklearn", "datasets/images/flower.jpg"),
    ("matplotlib:grace_hopper.jpg", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
PHOTOS_DIR = Path(__file__).parent / "photos"
# Photos shipped inside mpdeploy, in the order the crops visit them (after the dependencies'
# three); source and licence of each in photos/README.md. Three photos alone made the builtin
# calibration overfit: a 30 %-pruned efficientnet-lite0 fitted on them agreed with dense on
# 80-91 % of its calibration crops and 1-3 % of held-out ones (docs/pruning.md, "Diagnosis").
BUNDLED_PHOTOS = (
    "eagle.jpg",
    "camera.jpg",
    "coins.jpg",
    "clock_motion.jpg",
    "text.jpg",
    "ihc.jpg",
    "cell.jpg",
    "brick.jpg",
    "grass.jpg",
    "gravel.jpg",
)


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    images: torch.Tensor  # (N, 3, H, W) float32, preprocessed
    sources: list[str]
    skipped: int
    sha256: str
    seed: int
    origin: str  # "builtin:photos", "builtin:digits" or the folder
    refined: dict[str, Any] | None = None  # `refine.RefineRecord.record()` under --calib-refine

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def groups(self) -> list[str]:
        """Per image, the photo it was cut from: crops of one builtin photo share it (they are not
        independent samples, `prune/obs.py`'s `obs_shrink`); any other image is its own."""
        if self.origin == "builtin:photos":  # sources are "<photo label>#crop(...)"
            return [source.split("#", 1)[0] for source in self.sources]
        return list(self.sources)

    def record(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "count": len(self),
            "skipped": self.skipped,
            "seed": self.seed,
            "shape": list(self.images.shape),
            "sha256": self.sha256,
            "sources": self.sources,
            **({"refined": self.refined} if self.refined is not None else {}),
        }


def builtin_photos() -> list[tuple[str, Path]]:
    """Real photographs: three that our dependencies ship (skipped if a release moves them), then
    the ones shipped in mpdeploy/data/photos."""
    found = []
    for label, package, where in DEPENDENCY_PHOTOS:
        folder = _package_dir(package)
        if folder is not None and (folder / where).is_file():
            found.append((label, folder / where))
    return found + [(f"mpdeploy:{name}", PHOTOS_DIR / name) for name in BUNDLED_PHOTOS]


def _package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it (scikit-learn takes seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_calibration(
    source: str,
    size: int,
    data_config: dict[str, Any],
    seed: int = 0,
    model_name: str | None = None,
) -> CalibrationSet:
    """Load `size` calibration images from `source` ("builtin" or a folder), preprocessed."""
    if size < 1:
        raise UserError(f"--calib-size must be at least 1 (got {size})")
    transform = eval_transform(data_config)
    if source == "builtin":
        from mpdeploy.models.demo import DEMO_MODEL

        if model_name == DEMO_MODEL:
            images, sources = _digits_images(size, seed)
            origin = "builtin:digits"
        else:
            if size > BUILTIN_PHOTO_CROPS:
                log.warning(
                    "the builtin photo set holds %d distinct crops; calibrating on %d, not %d "
                    "(pass --calib DIR for more)",
                    BUILTIN_PHOTO_CROPS,
                    BUILTIN_PHOTO_CROPS,
                    size,
                )
                size = BUILTIN_PHOTO_CROPS
            check_calibration_memory(size, data_config["input_size"])
            images, sources = _photo_crops(size, seed)
            origin = "builtin:photos"
        skipped = 0
    else:
        check_calibration_memory(size, data_config["input_size"])
        images, sources, skipped = _folder_images(Path(source), size, seed)
        origin = str(Path(source).resolve())
    batch = torch.stack([transform(img) for img in images]).float().contiguous()
    return CalibrationSet(batch, sources, skipped, images_sha256(batch), seed, origin)


def images_sha256(images: torch.Tensor) -> str:
    """The sha256 recorded in calibration.json: of the preprocessed float32 tensor's bytes."""
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()


def check_calibration_memory(size: int, input_size: Sequence[int]) -> None:
    """Refuse a calibration batch that cannot fit in memory, before decoding a single image.

    The preprocessed batch is float32 (size × C × H × W); it is held a few times over (the images,
    the batch, a model's activations), so half the available memory is the limit.
    """
    needed = 4 * size * int(np.prod([int(v) for v in input_size]))
    available = available_memory()
    if available is not None and needed > available // 2:
        raise UserError(
            f"calibration batch of {size} × {'×'.join(str(int(v)) for v in input_size)} needs "
            f"{needed / 2**30:.1f} GiB; this machine has {available / 2**30:.1f} GiB available "
            "(lower --calib-size or --img-size)"
        )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def eval_transform(data_config: dict[str, Any]):
    import timm

    cfg = dict(data_config)
    cfg["input_size"] = tuple(cfg["input_size"])
    for key in ("mean", "std"):
        cfg[key] = tuple(cfg[key])
    return timm.data.create_transform(**cfg, is_training=False)


def _digits_images(size: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    from mpdeploy.data.digits import digits_pil_images

    pool = digits_pil_images("train")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [int(i) for i in order[: min(size, len(pool))]]
    if size > len(pool):
        log.warning("digits train split has %d images; calibrating on all of them", len(pool))
    return [pool[i] for i in chosen], [f"digits:train[{i}]" for i in chosen]


def _photo_crops(size: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """Seeded random crops (25–100 % area, random flip) of the bundled photos."""
    photos = [(label, Image.open(path).convert("RGB")) for label, path in builtin_photos()]
    if not photos:
        raise UserError("no builtin calibration photos found; pass --calib DIR")
    rng = np.random.default_rng(seed)
    images, sources = [], []
    for i in range(size):
        label, photo = photos[i % len(photos)]
        crop, where = random_crop(photo, rng)
        images.append(crop)
        sources.append(f"{label}#{where}")
    return images, sources


def random_crop(photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One crop of 25–100 % of the area at a random place, flipped half the time; its description."""
    w, h = photo.size
    scale = rng.uniform(0.25, 1.0)
    cw, ch = max(16, int(w * np.sqrt(scale))), max(16, int(h * np.sqrt(scale)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch))
    flip = bool(rng.integers(0, 2))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop, f"crop({x},{y},{cw},{ch}){'+flip' if flip else ''}"


class PhotoCropStream(torch.utils.data.Dataset):
    """Fresh random crops of a few source photos: an unlimited augmented stream for label-free
    recovery on the calibration photos (prune/recover.py).

    A fixed calibration set of 128 crops of a handful of photos is memorised by distillation long
    before the pruned network generalises (efficientnet-lite0, 2:4: docs/sparsity.md,
    "efficientnet-lite0, 2:4"); here item i of epoch e is a new crop (as `random_crop`, the
    builtin calibration's own crops) of photo i mod len(photos), drawn from the seed (seed, e, i)
    and preprocessed by the model's eval transform. `length` is the nominal epoch size.
    """

    def __init__(
        self,
        photos: Sequence[Image.Image],
        data_config: dict[str, Any],
        length: int,
        seed: int = 0,
        origin: str = "",
    ):
        if not photos:
            raise UserError("recovery on calibration photos needs at least one photo")
        if length < 1:
            raise UserError(f"a crop stream needs at least one crop per epoch (got {length})")
        self.photos = list(photos)
        self.transform = eval_transform(data_config)
        self.length, self.seed, self.origin, self.epoch = length, seed, origin, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crop, _ = random_crop(self.photos[index % len(self.photos)], rng)
        return self.transform(crop), -1  # no label (recover.UNLABELLED)


def calibration_photo_paths(calib: CalibrationSet, size: int) -> list[Path] | None:
    """The source photos a calibration set was cut from, where it came from only a few of them:
    the builtin photos, or a folder with fewer readable images than the `size` asked for
    (`--calib DIR` of a few photos). None for digits and for folders of many images."""
    if calib.origin == "builtin:photos":
        return [path for _, path in builtin_photos()]
    folder = Path(calib.origin)
    if calib.origin.startswith("builtin") or not folder.is_dir() or len(calib.sources) >= size:
        return None
    return [folder / source for source in calib.sources]


def calibration_photos(calib: CalibrationSet, size: int) -> list[Image.Image] | None:
    """`calibration_photo_paths`, decoded to RGB."""
    paths = calibration_photo_paths(calib, size)
    if paths is None:
        return None
    photos = []
    for path in paths:
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    return photos


def find_images(folder: Path) -> list[Path]:
    if not folder.exists():
        raise UserError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"--calib must be a folder of images or 'builtin': {folder}")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _folder_images(folder: Path, size: int, seed: int) -> tuple[list[Image.Image], list[str], int]:
    candidates = find_images(folder)
    order = np.random.default_rng(seed).permutation(len(candidates))
    images: list[Image.Image] = []
    sources: list[str] = []
    skipped = 0
    for idx in order:
        if len(images) == size:
            break
        path = candidates[int(idx)]
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            # DecompressionBombError: a file claiming more pixels than PIL's safety limit.
            skipped += 1
            continue
        sources.append(str(path.relative_to(folder)))
    if not images:
        raise UserError(
            f"no readable images in {folder} ({len(candidates)} image files, {skipped} unreadable)"
        )
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s", skipped, folder)
    if len(images) < size:
        log.warning("only %d readable images in %s (asked for %d)", len(images), folder, size)
    return images, sources, skipped


def save_calibration(calib: CalibrationSet, build_dir: Path) -> list[Path]:
    from safetensors.torch import save_file

    with atomic_path(build_dir / CALIBRATION_TENSORS) as tmp:
        save_file({"images": calib.images}, str(tmp))
    write_json(build_dir / CALIBRATION_JSON, calib.record())
    return [build_dir / CALIBRATION_JSON, build_dir / CALIBRATION_TENSORS]


def read_calibration(build_dir: Path) -> CalibrationSet:
    from safetensors.torch import load_file

    path = build_dir / CALIBRATION_JSON
    if not path.is_file():
        raise UserError(f"{build_dir} has no calibration (run the calibrate stage first)")
    record = read_json(path)
    images = load_file(str(build_dir / CALIBRATION_TENSORS))["images"]
    return CalibrationSet(
        images,
        record["sources"],
        record["skipped"],
        record["sha256"],
        record["seed"],
        record["origin"],
        record.get("refined"),
    )


def batches(images: torch.Tensor, batch_size: int) -> Sequence[torch.Tensor]:
    return [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
