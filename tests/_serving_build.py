"""A real, verified build directory for the serving tests, made without the pipeline.

timm `test_vit` is exported to ONNX with a dynamic batch, the PyTorch outputs on the parity
inputs are saved as Polygraphy `RunResults`, ONNX Runtime is compared against them, and the report
records the measured error and the tolerances. The layout follows docs/architecture.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

MODEL = "test_vit"
MAX_BATCH = 4
ATOL, RTOL = 1e-4, 1e-3
_DONE = ".complete"


def verified_build(base: Path) -> Path:
    """`base/build`, made once per test session and reused by every serving test module."""
    build = base / "build"
    if not (build / _DONE).exists():
        if build.exists():
            shutil.rmtree(build)
        make_build_dir(build)
        (build / _DONE).touch()
    return build


def copy_build(build: Path, target: Path) -> Path:
    shutil.copytree(build, target, ignore=shutil.ignore_patterns(_DONE))
    return target


def make_build_dir(build: Path, *, seed: int = 0) -> Path:
    from mpdeploy._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm
    import torch
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    (build / "engine").mkdir(parents=True)
    (build / "parity").mkdir()
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False).eval()
    input_shape = tuple(model.pretrained_cfg["input_size"])
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    torch.onnx.export(
        model,
        (torch.randn(2, *input_shape),),
        str(build / "model.onnx"),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
    )

    rng = np.random.default_rng(seed)
    feeds = [{"input": rng.standard_normal((n, *input_shape), dtype=np.float32)} for n in (1, 3)]
    with torch.no_grad():
        reference = [
            IterationResult({"logits": model(torch.from_numpy(f["input"])).numpy()}, "torch")
            for f in feeds
        ]
    with OnnxrtRunner(SessionFromOnnx(str(build / "model.onnx"))) as runner:
        engine_out = [runner.infer(f)["logits"] for f in feeds]
    max_abs = max(
        float(np.abs(o - r["logits"]).max()) for o, r in zip(engine_out, reference, strict=True)
    )
    assert max_abs <= ATOL, max_abs

    save_json(feeds, str(build / "parity" / "inputs.json"))
    RunResults([("torch", reference)]).save(str(build / "parity" / "reference.json"))
    num_classes = model.num_classes
    _write(
        build / "parity" / "report.json",
        {
            "verdict": "pass",
            "precision": "fp32",
            "tolerances": {"atol": ATOL, "rtol": RTOL},
            "max_abs_diff": max_abs,
        },
    )
    _write(
        build / "engine" / "engine.json",
        {
            "backend": "onnxruntime",
            "precision": "fp32",
            "onnx": "model.onnx",
            "artifact": "model.onnx",
            "max_batch": MAX_BATCH,
            "profile": {"min": 1, "opt": MAX_BATCH // 2, "max": MAX_BATCH},
            "input_name": "input",
            "output_name": "logits",
            "input_shape": list(input_shape),
            "num_classes": num_classes,
        },
    )
    _write(
        build / "manifest.json",
        {"model": {"alias": MODEL, "timm_name": MODEL, "num_classes": num_classes}},
    )
    return build


def make_plan_build(build: Path, target: Path) -> Path:
    """A TensorRT-shaped build from `build`: the plan bytes are opaque to publishing."""
    import dataclasses

    from mpdeploy.backends.base import EngineRecord, write_engine_record

    plan = copy_build(build, target)
    (plan / "engine" / "model.plan").write_bytes(b"not a real plan: publishing only copies it")
    engine = json.loads((plan / "engine" / "engine.json").read_text())
    fields = {f.name for f in dataclasses.fields(EngineRecord)}
    record = EngineRecord(
        **{
            **{k: v for k, v in engine.items() if k in fields},
            "backend": "tensorrt",
            "artifact": "engine/model.plan",
            "build_seconds": 1.0,
            "size_bytes": (plan / "engine" / "model.plan").stat().st_size,
            # The keys the TensorRT backend's build() writes (backends/tensorrt.py).
            "details": {
                "tensorrt_version": "10.13.0",
                "gpu": "NVIDIA H100 80GB HBM3",
                "compute_capability": "9.0",
            },
        }
    )
    write_engine_record(record, plan)
    return plan


def _write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
