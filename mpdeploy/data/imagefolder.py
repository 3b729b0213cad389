"""Labelled images in the ImageNet-val layout: one sub-folder per class, sorted names → indices."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mpdeploy.data.calibration import IMAGE_SUFFIXES
from mpdeploy.errors import UserError


def labelled_images(source: str) -> tuple[list[tuple[str, object]], list[str]]:
    """Return ([(label_index, loader)], class_names) for a folder or 'demo' (digits test split).

    Each loader is a PIL image (demo) or a Path opened lazily, so big folders are not held in RAM.
    """
    if source == "demo":
        from mpdeploy.data.digits import digits_pil_images, load_digits_split

        _, labels = load_digits_split("test")
        images = digits_pil_images("test")
        return list(zip((int(v) for v in labels), images, strict=True)), [str(i) for i in range(10)]
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"labelled image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected one folder per class)")
    items = [
        (index, path)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise UserError(f"no images under {root}")
    return items, classes


def open_image(item) -> Image.Image | None:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    try:
        with Image.open(item) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return None  # counted as unreadable by the caller
