"""scikit-learn's handwritten digits as RGB images: the data set of the bundled demo model.

The split is fixed: a stratified 80/20 `train_test_split(..., test_size=0.2, stratify=y,
random_state=0)` of the 1,797 images gives 1,437 training and 360 held-out test images. The demo
model is trained on "train" only; "test" is what `mpdeploy eval --data demo` scores.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
TEST_SIZE = 0.2
RANDOM_STATE = 0
NUM_CLASSES = 10
NATIVE_SIZE = 8  # load_digits images are 8x8 with integer values 0..16
NATIVE_MAX = 16


def load_digits_split(split: Split, *, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Return the images (N, size, size, 3) uint8 and labels (N,) int64 of one split.

    The arrays are fresh copies; the decoded split is cached in-process.
    """
    images, labels = _split_images(_check_split(split), size)
    return images.copy(), labels.copy()


def digits_pil_images(split: Split, *, size: int = 32) -> list:
    """The images of one split as RGB `PIL.Image`s, in the order of `load_digits_split`."""
    from PIL import Image

    images, _ = _split_images(_check_split(split), size)
    return [Image.fromarray(image, mode="RGB") for image in images]


def write_image_folder(split: Split, out_dir: str | os.PathLike, *, size: int = 32) -> Path:
    """Write one split in the ImageNet-val layout: `out_dir/<label>/<split>_<index>.png`."""
    from PIL import Image

    images, labels = _split_images(_check_split(split), size)
    root = Path(out_dir)
    for label in range(NUM_CLASSES):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image, mode="RGB").save(root / str(label) / f"{split}_{index:04d}.png")
    return root


def split_indices() -> dict[str, np.ndarray]:
    """Indices into `sklearn.datasets.load_digits()` of each split (sorted ascending)."""
    train, test = _split_index_pair()
    return {"train": train.copy(), "test": test.copy()}


def _check_split(split: str) -> str:
    if split not in SPLITS:
        from mpdeploy.errors import UserError

        raise UserError(f"unknown digits split '{split}': use one of {', '.join(SPLITS)}")
    return split


@functools.lru_cache(maxsize=1)
def _native_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _split_index_pair() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _native_digits()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=RANDOM_STATE
    )
    # Sorted so the order of a split does not depend on the shuffle inside train_test_split.
    return np.sort(train), np.sort(test)


@functools.lru_cache(maxsize=8)
def _split_images(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    native, labels = _native_digits()
    train, test = _split_index_pair()
    indices = train if split == "train" else test
    grey = np.rint(native[indices] * (255.0 / NATIVE_MAX)).astype(np.uint8)
    if size != NATIVE_SIZE:
        grey = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey]
        )
    images = np.repeat(grey[..., None], 3, axis=-1)
    images.setflags(write=False)
    split_labels = labels[indices]
    split_labels.setflags(write=False)
    return images, split_labels
