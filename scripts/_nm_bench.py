"""What the N:M timing scripts share: their common options and a random-weights timm model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def bench_parser(doc: str, *, model: str, images: int) -> argparse.ArgumentParser:
    """--model, --images, --repeats, --threads and --out (JSON), described by `doc`'s first line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=model)
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def random_model(name: str, threads: int) -> torch.nn.Module:
    """timm `name` with seeded random weights (as `--weights none`), eval mode, on `threads`."""
    import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

    import timm  # isort: skip

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()
