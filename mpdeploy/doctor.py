"""`mpdeploy doctor`: what this machine can do — versions, CPU/GPU, CUDA, TensorRT, Triton.

Every optional component is probed the same way the command that needs it would use it, so the
line doctor prints for TensorRT is the line `mpdeploy build --backend tensorrt` would fail with.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import shutil
from typing import Any


def gpu_devices() -> list[dict[str, Any]]:
    """CUDA GPUs visible to this process: name, compute capability, memory (empty when none).

    Asks PyTorch when it is a CUDA build, else the CUDA driver (libcuda) directly, so a CPU-only
    torch next to a working TensorRT install still sees the GPU.
    """
    devices = _torch_gpus()
    return devices if devices is not None else _driver_gpus()


def _torch_gpus() -> list[dict[str, Any]] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.version.cuda:
        return None  # CPU build: it cannot see a GPU even when there is one
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = []
        for index in range(count):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "index": index,
                    "name": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
        return devices
    except Exception:  # a broken driver must not break doctor
        return []


def _driver_gpus() -> list[dict[str, Any]]:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    devices = []
    for index in range(count.value):
        device = ctypes.c_int(0)
        if cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
            continue
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, device)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
        devices.append(
            {
                "index": index,
                "name": name.value.decode(errors="replace"),
                "compute_capability": f"{major.value}.{minor.value}",
            }
        )
    return devices


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": env["versions"],
        "torch_cuda": torch_cuda,
        "gpus": gpu_devices(),
        "onnxruntime_providers": providers,
        "tensorrt": _tensorrt(),
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
    rows = [
        ("mpdeploy", f"{d['mpdeploy']} on Python {d['python']} ({d['platform']})"),
        ("cpu", f"{d['cpu']}, {d['cpu_count']} cores"),
        ("gpu", gpus),
        (
            "torch cuda",
            f"build {tc['cuda_build'] or 'cpu-only'}, available: "
            f"{'yes' if tc['available'] else 'no'}",
        ),
        ("onnxruntime", ", ".join(d["onnxruntime_providers"]) or "not importable"),
        ("tensorrt", f"ready ({trt['version']})" if trt["usable"] else trt["backend_error"]),
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
    rows.append(("backends", "onnxruntime" + (", tensorrt" if trt["usable"] else "")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
