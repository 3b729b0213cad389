"""Which layers lose the most when they alone go N:M: the list to pass to `--sparsity-dense`.

Every eligible layer is made k:n (the build's own `sparsify`, no permutation, no compensation) in
an otherwise dense copy of the model, one layer at a time; each copy is scored against the dense
model on the evaluation images (top-1 agreement and KL(dense ‖ copy), mean per image). Layers are
printed worst first with their share of the model's MACs, and the JSON written with `--out`.

Score on images that are *not* the calibration images where you can (`--eval DIR`): on
efficientnet-lite0 with 14 calibration photos the data-aware choices fit those photos and not
held-out ones (docs/sparsity.md, "efficientnet-lite0, 2:4"). What leaving the worst layers dense
bought there: docs/sparsity.md, "Layers left dense".

    python scripts/nm_sensitivity.py --model resnet50 --weights r50.safetensors \\
        --calib photos/ --eval held_out/ --pattern 2:4 --out sens.json
    mpdeploy build ... --sparsity 2:4 --sparsity-dense 'layer1.0.conv1' ...
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--weights", default="hub", help="hub, none or a weights file")
    p.add_argument("--calib", default="builtin", help="builtin or a folder of images")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--eval", default=None, help="folder of images to score on [the calibration]")
    p.add_argument("--eval-size", type=int, default=96)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--method", default="magnitude", help="how each layer picks its k of n")
    p.add_argument("--out", default=None, help="JSON file for the per-layer table")
    return p.parse_args(argv)


def _logits(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in images.split(batch_size)])


def layer_sensitivity(
    model, calib, images, k: int, n: int, method: str, only: list[str] | None = None
) -> list[dict]:
    """One row per eligible layer (whose name contains one of `only`, when given): agreement and
    KL of the model with only that layer k:n."""
    from mpdeploy.prune.macs import count_macs
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    model = model.eval()
    config = SparsityConfig(k, n, method=method, permute=False, compensate="none")
    shape = tuple(images.shape[1:])
    result = sparsify(model, calib, config, input_shape=shape)
    macs = {layer.name: layer.macs for layer in count_macs(model, (1, *shape)).layers}
    total = sum(macs.values()) or 1
    dense = _logits(model, images)
    log_p = F.log_softmax(dense, -1)
    sparse = dict(result.model.named_parameters())
    rows = []
    for param in sorted(result.masks):
        if only and not any(part in param for part in only):
            continue
        hybrid = copy.deepcopy(model)
        with torch.no_grad():
            hybrid.get_parameter(param).copy_(sparse[param])
        out = _logits(hybrid, images)
        kl = F.kl_div(F.log_softmax(out, -1), log_p, log_target=True, reduction="batchmean")
        name = param.rpartition(".")[0]
        rows.append(
            {
                "layer": name,
                "agreement": float((out.argmax(-1) == dense.argmax(-1)).float().mean()),
                "kl": float(kl),
                "mac_share": macs.get(name, 0) / total,
            }
        )
    return sorted(rows, key=lambda r: -r["kl"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.errors import UserError
    from mpdeploy.models import create_model
    from mpdeploy.pipeline import parse_sparsity

    try:
        pattern = parse_sparsity(args.pattern)
        if pattern is None:
            raise UserError("--pattern must be k:n")
        loaded = create_model(args.model, weights=args.weights)
        calib = load_calibration(
            args.calib, args.calib_size, loaded.data_config, model_name=loaded.spec.timm_name
        )
        images = calib.images
        if args.eval:
            images = load_calibration(args.eval, args.eval_size, loaded.data_config).images
        rows = layer_sensitivity(loaded.model, calib.images, images, *pattern, args.method)
    except UserError as exc:
        print(f"nm_sensitivity: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'layer':<40} {'agreement':>9} {'KL':>8} {'MACs':>6}")
    for r in rows:
        print(f"{r['layer']:<40} {r['agreement']:>9.3f} {r['kl']:>8.4f} {r['mac_share']:>6.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"pattern": args.pattern, "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
