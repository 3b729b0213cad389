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


@pytest.fixture
def one_thread():
    """torch on one thread: the N:M per-group loops are many small ops, and on a loaded 2-core
    machine 2 threads are far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
