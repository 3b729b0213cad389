"""The analyze stage on timm's tiny test_vit: per-layer fits, budget weights, json and png files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import mpdeploy.models  # noqa: F401  (makes timm importable)
from mpdeploy.errors import UserError
from mpdeploy.spectrum import analyze_model, default_highlight, load_spectrum, write_spectrum

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    weight = model.blocks[2].mlp.fc1.weight  # plant a rank-2 signal far above the BBP threshold
    u = torch.linalg.qr(torch.randn(weight.shape[0], 2))[0]
    v = torch.linalg.qr(torch.randn(weight.shape[1], 2))[0]
    with torch.no_grad():
        weight += u @ torch.diag(torch.tensor([3.0, 2.0])) @ v.T
    return model


@pytest.fixture(scope="module")
def report(model):
    return analyze_model(model, sparsity=0.3)


def test_every_linear_and_conv_is_analysed(model, report):
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert report.names() == expected and len(expected) == 26
    patch = report.layer("patch_embed.proj")
    assert patch.kind == "conv" and patch.shape == (64, 3, 16, 16)
    assert (patch.fit.rows, patch.fit.cols) == (64, 3 * 16 * 16)
    assert report.layer("blocks.0.attn.qkv").layer_type == "attn"
    assert report.layer("blocks.0.mlp.fc2").layer_type == "mlp"
    assert report.layer("head").layer_type == "other"


def test_planted_layer_has_two_spikes_and_is_highlighted(report):
    counts = {layer.name: layer.fit.spike_count for layer in report.layers}
    assert counts.pop("blocks.2.mlp.fc1") == 2
    assert sum(c > 0 for c in counts.values()) <= 2  # at 95 % per layer, a false alarm is rare
    assert default_highlight(report) == "blocks.2.mlp.fc1"


def test_z_scores_and_budget_weights(report):
    z = np.array([layer.sigma_plus_z for layer in report.layers])
    assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std() == pytest.approx(1.0)
    decay = 1 - 0.3 / 0.5  # regime 0.2 < s ≤ 0.4: σ+ signal, β = 1, s_d = 0.5
    for layer in report.layers:
        assert layer.budget_weight == pytest.approx(max(0.1, 1 + decay * layer.sigma_plus_z))


def test_written_files_round_trip(report, tmp_path):
    json_path, png_path = write_spectrum(report, tmp_path)
    data = json.loads(json_path.read_text())
    assert [r["name"] for r in data["layers"]] == report.names()
    record = data["layers"][0]
    for key in (
        "sigma_plus",
        "lambda_plus",
        "bulk_fraction",
        "spike_count",
        "fit_error",
        "budget_weight",
    ):
        assert key in record
    assert data["highlight_layer"] == "blocks.2.mlp.fc1"
    assert sum("eigenvalues" in r for r in data["layers"]) == 1
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    loaded = load_spectrum(tmp_path)
    assert loaded == report
    assert loaded.layer("blocks.2.mlp.fc1").fit.eigenvalues == pytest.approx(
        report.layer("blocks.2.mlp.fc1").fit.eigenvalues
    )
    # A loaded report redraws its picture, including a layer whose eigenvalues were not kept.
    write_spectrum(loaded, tmp_path / "again", highlight_layer="head")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "spectrum.json",
        "spectrum.png",
    ]


def test_names_restrict_and_errors_name_the_layer(model):
    sub = analyze_model(model, names=["head", "blocks.0.attn.qkv"])
    assert sub.names() == ["blocks.0.attn.qkv", "head"]
    with pytest.raises(UserError, match="blocks.9.nope"):
        analyze_model(model, names=["blocks.9.nope"])
    broken = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    nn.init.zeros_(broken[1].weight)
    with pytest.raises(UserError, match="layer '1'"):
        analyze_model(broken)


def test_load_spectrum_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="analyze"):
        load_spectrum(tmp_path)
