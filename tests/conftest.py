"""Shared fixtures: small timm models, a quiet Polygraphy, isolated working directories."""

from __future__ import annotations

import os

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub access fails fast and deterministically
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

torch.set_num_threads(2)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory so default build paths (engines/…) land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
