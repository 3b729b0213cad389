"""mpdeploy.hardware: the one probe of CPU flags and GPUs that doctor, the manifest, the backends
and the benchmark share."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mpdeploy import hardware

# First processor blocks of /proc/cpuinfo as Linux prints them (flags trimmed to what matters).
EPYC_GENOA = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 vaes

processor\t: 1
model name\t: something else
"""
SAPPHIRE_RAPIDS = """vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: avx2 fma avx512f avx512_vnni avx512_fp16 amx_tile amx_bf16 amx_int8 avx_vnni
"""
MILAN = """vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: sse4_2 avx f16c avx2 fma bmi2
"""


def test_parse_cpuinfo_names_the_isa_that_decides_bf16():
    genoa = hardware.parse_cpuinfo(EPYC_GENOA, logical_cores=2)
    assert genoa.model == "AMD EPYC 9R14 96-Core Processor"  # the first block only
    assert genoa.vendor == "AuthenticAMD" and genoa.logical_cores == 2
    assert genoa.flags == ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")
    assert genoa.avx512 and genoa.native_bf16 and not genoa.amx

    spr = hardware.parse_cpuinfo(SAPPHIRE_RAPIDS, logical_cores=8)
    assert spr.amx and spr.native_bf16 and "avx512_bf16" not in spr.flags

    milan = hardware.parse_cpuinfo(MILAN, logical_cores=2)
    assert milan.flags == ("avx2", "fma")
    assert not milan.avx512 and not milan.native_bf16
    assert milan.describe() == "AMD EPYC 7B13, 2 cores (avx2, fma)"
    record = milan.to_dict()
    assert record["native_bf16"] is False and record["flags"] == ["avx2", "fma"]


def test_this_machine_agrees_with_proc_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if not text:
        pytest.skip("no /proc/cpuinfo on this platform")
    cpu = hardware.cpu_info()
    # what `grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo` tells a user
    found = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", text))
    assert cpu.native_bf16 is bool(found)
    assert cpu.avx512 is bool(re.search(r"\bavx512f\b", text))
    assert cpu.logical_cores >= 1
    assert hardware.cpu_info() is cpu  # probed once per process


def test_summary_is_json_and_gpus_are_probed_once():
    summary = hardware.summary()
    json.dumps(summary)
    assert summary["cpu"]["model"] == hardware.cpu_info().model
    assert hardware.gpu_devices() is hardware.gpu_devices()
    assert summary["gpus"] == [dict(g) for g in hardware.gpu_devices()]


def test_torch_cuda_reason_matches_torch():
    import torch

    reason = hardware.torch_cuda_unavailable_reason()
    assert (reason is None) == (bool(torch.version.cuda) and torch.cuda.is_available())
    assert hardware.torch_cuda() is (reason is None)
    if not torch.version.cuda:
        assert reason.startswith(f"PyTorch {torch.__version__} is a CPU-only build")
