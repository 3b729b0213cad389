"""`mpdeploy doctor`: what this machine can do — versions, CPU/GPU, CUDA, backends, Triton.

Every optional component is probed the same way the command that needs it would use it, so the
line doctor prints for a backend is the line `mpdeploy build --backend …` would fail with. CPU
and GPU facts come from `mpdeploy.hardware`, the probe every other part uses.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

from mpdeploy import hardware


def _tensorrt() -> dict[str, Any]:
    from mpdeploy.backends.tensorrt import tensorrt_unavailable_reason, tensorrt_version

    reason = tensorrt_unavailable_reason()
    try:
        version = tensorrt_version()
    except Exception:
        version = None
    return {
        "version": version,
        "usable": reason is None,
        "reason": reason,
        # exactly what `mpdeploy build --backend tensorrt` prints when it refuses
        "backend_error": f"--backend tensorrt is not available here: {reason}" if reason else None,
    }


def _backends() -> dict[str, dict[str, str | None]]:
    """For every registered backend and each device/precision it offers: None when it can run
    here, else the one line `mpdeploy build` would refuse it with."""
    from mpdeploy.backends import EngineOptions, get_backend, registered_backends
    from mpdeploy.errors import UserError

    table: dict[str, dict[str, str | None]] = {}
    for name, cls in registered_backends().items():
        backend = get_backend(name, require_available=False)
        table[name] = {}
        for device in cls.devices:
            for precision in cls.precisions:
                try:
                    backend.check(EngineOptions(precision=precision, device=device))
                    reason = None
                except UserError as exc:
                    reason = str(exc)
                table[name][f"{device} {precision}"] = reason
    return table


def _openvino() -> dict[str, Any]:
    from mpdeploy.backends.openvino import (
        cpu_capabilities,
        openvino_unavailable_reason,
        openvino_version,
    )

    reason = openvino_unavailable_reason("fp32")
    if reason:
        return {"version": None, "reason": reason, "capabilities": []}
    return {"version": openvino_version(), "reason": None, "capabilities": cpu_capabilities()}


def _triton() -> dict[str, Any]:
    from mpdeploy.errors import MissingDependencyError

    result: dict[str, Any] = {
        "pytriton": importlib.util.find_spec("pytriton") is not None,
        "tritonclient": importlib.util.find_spec("tritonclient") is not None,
        "system_tritonserver": shutil.which("tritonserver"),
    }
    try:
        from mpdeploy.serving.server import find_bundled_server

        bundle = find_bundled_server()
        result["bundled_tritonserver"] = str(bundle.server_dir / "bin" / "tritonserver")
        result["server_reason"] = None
    except MissingDependencyError as exc:
        result["bundled_tritonserver"] = None
        result["server_reason"] = str(exc)
    import numpy

    if result["bundled_tritonserver"] and int(numpy.__version__.split(".")[0]) >= 2:
        result["server_reason"] = (
            f"the bundled Triton python backend needs numpy<2 (found {numpy.__version__})"
        )
    result["local_serving"] = result["server_reason"] is None and result["tritonclient"]
    return result


def diagnose() -> dict[str, Any]:
    """Everything doctor knows, as a JSON-serialisable dict."""
    from mpdeploy.manifest import environment

    env = environment()
    try:
        import torch

        torch_cuda = {"cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
    except Exception as exc:
        torch_cuda = {"cuda_build": None, "available": False, "error": str(exc)[:200]}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception:
        providers = []
    return {
        "mpdeploy": env["mpdeploy"],
        "python": env["python"],
        "platform": env["platform"],
        "cpu": hardware.cpu_info().to_dict(),
        "cpu_count": hardware.cpu_info().logical_cores,
        "versions": env["versions"],
        "torch_cuda": torch_cuda,
        "gpus": [dict(g) for g in hardware.gpu_devices()],
        "onnxruntime_providers": providers,
        "tensorrt": _tensorrt(),
        "openvino": _openvino(),
        "backends": _backends(),
        "triton": _triton(),
    }


def format_diagnosis(d: dict[str, Any]) -> str:
    """A short, aligned, human-readable report of `diagnose()`."""
    versions = d["versions"]
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    missing = ", ".join(k for k, v in versions.items() if not v)
    gpus = (
        "; ".join(f"{g['name']} (sm {g['compute_capability']})" for g in d["gpus"])
        or "none visible"
    )
    tc = d["torch_cuda"]
    trt = d["tensorrt"]
    tri = d["triton"]
    cpu = d["cpu"]
    isa = ", ".join(cpu["flags"]) or "no AVX2/AVX-512/AMX"
    bf16 = "native bf16" if cpu["native_bf16"] else "no native bf16"
    ov = d["openvino"]
    rows = [
        ("mpdeploy", f"{d['mpdeploy']} on Python {d['python']} ({d['platform']})"),
        ("cpu", f"{cpu['model']}, {d['cpu_count']} cores; {isa}; {bf16}"),
        ("gpu", gpus),
        (
            "torch cuda",
            f"build {tc['cuda_build'] or 'cpu-only'}, available: "
            f"{'yes' if tc['available'] else 'no'}",
        ),
        ("onnxruntime", ", ".join(d["onnxruntime_providers"]) or "not importable"),
        ("tensorrt", f"ready ({trt['version']})" if trt["usable"] else trt["backend_error"]),
        (
            "openvino",
            f"{ov['version']} (CPU: {', '.join(ov['capabilities'])})"
            if ov["version"]
            else ov["reason"],
        ),
        (
            "triton server",
            tri["bundled_tritonserver"] or tri["system_tritonserver"] or tri["server_reason"],
        ),
        (
            "triton client",
            "tritonclient installed"
            if tri["tritonclient"]
            else "tritonclient not installed (pip install 'mpdeploy[serve]')",
        ),
        (
            "local serving",
            "yes" if tri["local_serving"] else f"no: {tri['server_reason'] or 'no client'}",
        ),
        ("packages", shown),
    ]
    if missing:
        rows.append(("not installed", missing))
    ready = [
        f"{name} {combo}"
        for name, combos in d["backends"].items()
        for combo, reason in combos.items()
        if reason is None
    ]
    rows.append(("backends", ", ".join(ready)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
