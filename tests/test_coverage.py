"""Coverage of timm by the registry: meta-device checks, `mpdeploy families`, scripts/coverage.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mpdeploy.cli import main
from mpdeploy.families import registered_families
from mpdeploy.families.coverage import check_architecture, pattern_architectures

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnext50_32x4d", "resnet"),
        ("regnety_002", "regnet"),
        ("swinv2_tiny_window8_256", "swin"),
        ("deit_tiny_distilled_patch16_224", "vit"),
    ],
)
def test_full_size_architectures_are_accepted_on_the_meta_device(name, family):
    verdict = check_architecture(name)
    assert verdict.accepted, verdict.reason
    assert verdict.family == family and verdict.groups > 0 and verdict.params > 1_000_000


def test_refusals_carry_the_reason():
    beit = check_architecture("beit_base_patch16_224")
    assert (beit.accepted, beit.family, beit.model_class) == (False, None, "Beit")
    assert beit.reason == "no family for Beit"
    # AIMv2 is a VisionTransformer with SwiGLU MLPs: the vit family matches it, then refuses
    swiglu = check_architecture("aimv2_large_patch14_224")
    assert swiglu.family == "vit" and not swiglu.accepted
    assert "blocks.0" in swiglu.reason and "\n" not in swiglu.reason


def test_families_command_lists_every_registered_family(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    for family in registered_families():
        count = len(pattern_architectures(family))
        assert f"{family.name}: " in out and f"— {count} timm names" in out
    assert "resnext50_32x4d" not in out  # the short listing; --all names every match
    assert main(["families", "--all"]) == 0
    assert "resnext50_32x4d" in capsys.readouterr().out


def test_coverage_script_writes_counts_refusals_and_an_exact_sample(tmp_path):
    out, cache = tmp_path / "coverage.md", tmp_path / "coverage.jsonl"
    names = ["regnetx_002", "beit_base_patch16_224"]
    spec = importlib.util.spec_from_file_location("coverage_script", ROOT / "scripts/coverage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in-process: torch and timm are already imported
    args = ["--only", *names, "--sample", "1", "--out", str(out), "--cache", str(cache)]
    assert script.main(args) == 0
    text = out.read_text()
    assert "**1 of 2 architectures accepted**" in text
    assert "| regnet | 1 |" in text and "| swin | 0 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| regnetx_002 |"))
    assert "| yes |" in row  # the real cut equals its masked twin
    assert "| Beit | - | 1 | no family for Beit | beit_base_patch16_224 |" in text
    assert len(cache.read_text().splitlines()) == 2  # one cached verdict per architecture
