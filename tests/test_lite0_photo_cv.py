"""scripts/lite0_photo_cv.py: the folds never touch a test photo, cover the others once, and bad
input is one line. (The pruning itself is the accuracy suite's `prune`, tested there.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cv():
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import lite0_photo_cv

    return lite0_photo_cv


def test_folds_cover_every_non_test_photo_once(cv):
    names = cv.photo_names()
    assert len(names) == len(set(names)) == 17
    test_photos = {f"skimage:{n}" for n in cv.suite.PHOTO_SPLITS["test"]}
    assert not test_photos & set(names)
    parts = cv.folds(names)
    assert len(parts) == cv.FOLDS
    flat = [n for part in parts for n in part]
    assert sorted(flat) == sorted(names)  # disjoint and complete
    assert {len(p) for p in parts} == {2, 3}  # 17 photos round-robin over 6 folds
    assert cv.folds(names) == parts  # seeded
    assert cv.folds(names, seed=8) != parts
    with pytest.raises(ValueError):
        cv.folds(names, count=1)


def test_every_photo_loads(cv):
    # the photos come with scikit-image (the `benchmark` extra), matplotlib and scikit-learn
    for module in ("skimage", "matplotlib", "sklearn"):
        pytest.importorskip(module, reason=f"{module} holds some of the photos (`benchmark` extra)")
    photos = cv.load_photos(cv.photo_names())
    assert all(min(p.size) >= 64 and p.mode == "RGB" for p in photos.values())


def test_table_means_over_the_folds_it_has(cv):
    records = [
        {"fold": 0, "method": "m", "compensate": "c", "target": 0.3, "agreement": 0.5, "kl": 1.0},
        {"fold": 1, "method": "m", "compensate": "c", "target": 0.3, "agreement": 0.25, "kl": 2.0},
        {"fold": 1, "method": "n", "compensate": "c", "target": "2:4", "agreement": 0.1, "kl": 3.0},
        {"fold": 0, "method": "m", "compensate": "c", "target": 0.3, "agreement": 0.0, "kl": 4.0}
        | {"prune_seed": 1},
    ]
    lines = cv.table(records)
    assert lines[0].startswith("| method | compensation | target | prune seed | fold 0 | fold 1 |")
    assert lines[2] == "| m | c | 0.3 | 0 | 50.0% / 1.00 | 25.0% / 2.00 | 37.5% | 1.500 |"
    assert lines[3] == "| m | c | 0.3 | 1 | 0.0% / 4.00 | – | 0.0% | 4.000 |"  # its own row
    assert lines[4] == "| n | c | 2:4 | 0 | – | 10.0% / 3.00 | 10.0% | 3.000 |"


@pytest.mark.parametrize(
    "argv",
    [
        ["--cells", "nope/lsq+bn/0.3"],
        ["--cells", "magnitude/nope/0.3"],
        ["--cells", "x"],
        ["--folds", "6"],
    ],
)
def test_bad_input_is_one_line(cv, argv, capsys, tmp_path):
    out = tmp_path / "cv.jsonl"
    assert cv.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()
