"""scripts/accuracy_plot.py: the values it draws are the payload's, as a share of dense."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import accuracy_plot  # noqa: E402

NAMES = {"method": "crit", "compensate": "lsq", "nm_method": "obs"}


def cell(model, method, comp, target, epochs, top1, seed=0, dense=0.8):
    return {
        "model": model,
        "method": method,
        "compensate": comp,
        "target": target,
        "recover_epochs": epochs,
        "seed": seed,
        "top1": top1,
        "dense_top1": dense,
    }


def payload():
    test = [
        cell("vit_t", "crit", "lsq", 0.3, 0, 0.8),
        cell("vit_t", "crit", "lsq", 0.5, 0, 0.6),
        cell("vit_t", "crit", "lsq", 0.7, 0, 0.4),
        cell("vit_t", "crit", "lsq", 0.7, 1, 0.7, seed=0),
        cell("vit_t", "crit", "lsq", 0.7, 1, 0.5, seed=1),  # +1 epoch: mean of seeds, 0.6
        cell("vit_t", "magnitude", "lsq", 0.7, 0, 0.2),
        cell("vit_t", "tp_magnitude", "none", 0.7, 0, 0.1),
        cell("vit_t", "tp_taylor", "none", 0.7, 0, 0.3),
        cell("vit_t", "nm_obs", "lsq", "2:4", 0, 0.76),
        cell("vit_t", "nm_magnitude", "none", "2:4", 0, 0.72),  # falls back to 'none'
        cell("demo", "crit", "lsq", 0.7, 0, 0.45, dense=0.9),
        {"model": "demo", "method": "crit", "compensate": "lsq", "target": 0.5, "error": "boom"},
    ]
    other = [cell("vit_t", "crit", "lsq", 0.7, 0, 0.25, dense=0.5)]  # 50 % of its own dense
    return {"splits": {"test": test}, "trainings": {"1": {"test": other}}}


def test_series_are_percent_of_dense_with_band_and_fallbacks():
    data = accuracy_plot.series(payload(), "test", "crit", "lsq", "obs")
    assert list(data) == ["demo", "vit_t"]  # accuracy_plot.ORDER, not the records' order
    vit = data["vit_t"]
    assert vit["default"][0] == pytest.approx([100, 100, 75, 50])
    assert vit["default"][1] == [100.0, None, None, pytest.approx(75)]
    assert vit["magnitude"][0] == [100.0, None, None, pytest.approx(25)]
    assert vit["tp_best"][0][3] == pytest.approx(37.5)  # the better of the two importances
    assert vit["band"][0] is None and vit["band"][2] == pytest.approx((50, 50))
    assert vit["nm"]["obs"] == {0: pytest.approx(95), 1: None}
    assert vit["nm"]["magnitude"][0] == pytest.approx(90)
    assert vit["trainings"] == 2
    assert data["demo"]["default"][0][3] == pytest.approx(50)
    assert data["demo"]["default"][0][2] is None  # the failed cell is not drawn
    assert data["demo"]["trainings"] == 1


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "images" / "accuracy-test.png"
    data = accuracy_plot.plot(payload(), "test", NAMES, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert set(data) == {"demo", "vit_t"}
