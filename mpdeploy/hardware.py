"""The one probe of this machine's CPU (model, cores, ISA flags) and CUDA GPUs, shared by doctor,
the manifest, the backends and the benchmark. Each probe runs once per process (cached).

CPU flags come from /proc/cpuinfo (Linux's names: `avx512f`, `avx512_bf16`, `amx_bf16`, …), so
what mpdeploy decides (e.g. refusing OpenVINO bf16 on a CPU without native bf16) is exactly what
`grep -o avx512_bf16 /proc/cpuinfo` shows a user.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import platform
from typing import Any

# Flags worth naming in reports: vector width, int8 dot products, native bf16 and AMX tiles.
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    logical_cores: int
    flags: tuple[str, ...]  # the REPORTED_FLAGS this CPU has

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512_BF16 or AMX-BF16), what OpenVINO needs to run
        bf16 inference instead of falling back to f32."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def describe(self) -> str:
        isa = ", ".join(self.flags) or "no AVX2/AVX-512/AMX flags"
        return f"{self.model}, {self.logical_cores} cores ({isa})"

    def to_dict(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["flags"] = list(self.flags)
        payload.update(avx512=self.avx512, native_bf16=self.native_bf16, amx=self.amx)
        return payload


def parse_cpuinfo(text: str, logical_cores: int | None = None) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (first processor block)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    present = set(fields.get("flags", "").split())
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        vendor=fields.get("vendor_id", ""),
        logical_cores=logical_cores or os.cpu_count() or 1,
        flags=tuple(f for f in REPORTED_FLAGS if f in present),
    )


@functools.cache
def cpu_info() -> CpuInfo:
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, _usable_cores())


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- GPUs ---------------------------------------------------------------------------------------


@functools.cache
def gpu_devices() -> tuple[dict[str, Any], ...]:
    """CUDA GPUs visible to this process: name, compute capability, memory (empty when none).

    Asks PyTorch when it is a CUDA build, else the CUDA driver (libcuda) directly, so a CPU-only
    torch next to a working TensorRT or onnxruntime-gpu install still sees the GPU.
    """
    devices = _torch_gpus()
    return tuple(devices if devices is not None else _driver_gpus())


def torch_cuda_unavailable_reason() -> str | None:
    """None when PyTorch can run on a CUDA GPU here, else one line saying why not."""
    import torch

    if not torch.version.cuda:
        return f"PyTorch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to PyTorch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def torch_cuda() -> bool:
    """PyTorch can put tensors on a CUDA GPU here (how GPU runners are fed)."""
    try:
        return torch_cuda_unavailable_reason() is None
    except ImportError:
        return False


def summary() -> dict[str, Any]:
    """CPU and GPUs as one JSON-serialisable record (manifest, bench.json, doctor)."""
    gpus = [dict(g) for g in gpu_devices()]
    cuda = None
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        pass
    return {"cpu": cpu_info().to_dict(), "gpus": gpus, "torch_cuda_build": cuda}


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
    except Exception:  # a broken driver must not break a CPU build or doctor
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
