"""scripts/photo_task.py: the photo-patch task's splits are seeded and disjoint, and its table
reports what the rows say."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import photo_task

    return photo_task


def test_patches_are_seeded_round_robin_and_differ_between_splits(task):
    pytest.importorskip(
        "skimage", reason="the task's photos ship with scikit-image (benchmark extra)"
    )
    images, labels = task.patches("calib")
    again, labels_again = task.patches("calib")
    classes = len(task.photos())
    assert classes == task.CLASSES == 21
    assert images.shape == (task.SPLIT_SIZES["calib"], task.SIZE, task.SIZE, 3)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    np.testing.assert_array_equal(labels, np.arange(len(labels)) % classes)
    val, _ = task.patches("val")
    calib_rows = {image.tobytes() for image in images}
    assert not any(image.tobytes() in calib_rows for image in val)


def row(model, method, target, val, test, seed=0):
    return {
        "model": model,
        "method": method,
        "target": target,
        "seed": seed,
        "val": val,
        "test": test,
        "dense_val": 0.9,
        "dense_test": 0.8,
    }


def test_table_means_draws_and_epochs_apart_and_keeps_magnitude_out_of_best_other(task):
    rows = [
        row("m", "mp_fisher_split", 0.5, 0.80, 0.70, seed=0),
        row("m", "mp_fisher_split", 0.5, 0.90, 0.60, seed=1),
        row("m", "magnitude", 0.5, 0.99, 0.99),
        row("m", "taylor", 0.5, 0.50, 0.50),
        row("m", "mp", 0.5, 0.60, 0.55),
        row("m", "tp_magnitude", 0.5, 0.20, 0.10),
        row("m", "tp_taylor", 0.5, 0.30, 0.40),
        row("m", "nm_obs_shrink", "2:4", 0.70, 0.70),
        row("m", "nm_magnitude", "2:4", 0.75, 0.65),
        {**row("m", "mp_fisher_split", 0.5, 0.95, 0.85), "recover_epochs": 1},
        {**row("m", "mp_fisher_split", 0.5, 0.85, 0.75), "recover_epochs": 1},
        {**row("m", "magnitude", 0.5, 0.70, 0.60), "recover_epochs": 1},
    ]
    lines = task.table(rows).splitlines()
    assert lines[2] == (
        "| m | 50% | zero-shot | 90.0 / 80.0 | 85.0 / 65.0 | `mp` 60.0 / 55.0 | 99.0 / 99.0 "
        "| `tp_taylor` 30.0 / 40.0 |"
    )
    assert lines[3] == "| m | 50% | + 1 ep | 90.0 / 80.0 | 90.0 / 80.0 | – | 70.0 / 60.0 | – |"
    assert lines[4] == "| m | 2:4 | zero-shot | 90.0 / 80.0 | 70.0 / 70.0 | – | 75.0 / 65.0 | – |"
    assert len(lines) == 5


def test_table_refuses_rows_of_two_trainings(task):
    rows = [
        {**row("m", "magnitude", 0.5, 0.9, 0.9), "train_seed": 0},
        {**row("m", "magnitude", 0.5, 0.8, 0.8), "train_seed": 1},
    ]
    with pytest.raises(ValueError, match="2 trainings"):
        task.table(rows)
