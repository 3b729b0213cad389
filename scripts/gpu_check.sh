#!/usr/bin/env bash
# One-shot GPU evidence for mpdeploy, sized for one NVIDIA GPU and 8 minutes:
#   1. every `gpu`/`tensorrt`-marked test that can run there (the others skip with their reason),
#   2. scripts/bench_gpu.py for vit_b16 and resnet50: dense bf16 vs MP-pruned bf16 vs 2:4 vs
#      pruned + 2:4, batch 64 and 256 (CUDA graphs, CUDA events, interleaved),
# and writes OUT/gpu_check.json (GPU, test outcome, the benchmark's JSON) plus OUT/gpu_check.log.
#
#   bash scripts/gpu_check.sh [OUT]          # default OUT: ./gpu_check
#
# Needs only what a GPU machine with a CUDA build of torch, timm, onnx and onnxruntime has, plus
# mpdeploy's small pure-Python dependencies (polygraphy, click, safetensors, onnxslim, tqdm,
# scikit-learn for the built-in calibration photos). mpdeploy runs from this checkout
# (PYTHONPATH), nothing is installed; MPDEPLOY_DEPS=DIR adds a folder of extra packages to the path.
# No network is used (HF_HUB_OFFLINE=1, --weights none: untrained weights, speed only).
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$ROOT${MPDEPLOY_DEPS:+:$MPDEPLOY_DEPS}${PYTHONPATH:+:$PYTHONPATH}"
export POLYGRAPHY_AUTOINSTALL_DEPS=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
exec > >(tee "$LOG") 2>&1
START=$(date +%s)
echo "gpu_check: $(date -u +%FT%TZ) in $ROOT -> $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$PY" - <<'EOF'
import importlib.util, sys
need = ["torch", "timm", "onnx", "onnxruntime", "numpy", "pytest", "polygraphy", "click",
        "safetensors", "onnxslim", "tqdm", "sklearn", "mpdeploy"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print(f"gpu_check: missing Python modules: {', '.join(missing)} (set MPDEPLOY_DEPS)")
import torch
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}")
EOF

# 1. marked tests (≤ 3 min). Modules whose optional imports are missing are reported, not fatal.
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" -rs \
    --continue-on-collection-errors --junitxml="$OUT/pytest.xml" tests/
TESTS_RC=$?

# 2. the GPU benchmark (≤ 4.5 min)
timeout 270 "$PY" scripts/bench_gpu.py --models vit_b16 resnet50 --batches 64 256 \
    --weights none --calib-size 32 --iterations 30 --warmup 10 --out "$OUT/bench_gpu.json"
BENCH_RC=$?

"$PY" - "$OUT" "$TESTS_RC" "$BENCH_RC" "$START" <<'EOF'
import json, subprocess, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def smi():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
tests = {"returncode": tests_rc}
if (out / "pytest.xml").is_file():
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    if suite is not None:
        tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        tests["cases"] = [
            {"name": f"{c.get('classname')}::{c.get('name')}",
             "outcome": next((child.tag for child in c), "passed"),
             "message": next((child.get("message", "")[:300] for child in c), "")}
            for c in suite.iter("testcase")]
bench = json.loads((out / "bench_gpu.json").read_text()) if (out / "bench_gpu.json").is_file() else None
report = {"gpu": smi(), "seconds": round(time.time() - start), "tests": tests,
          "bench_gpu": {"returncode": bench_rc, "results": bench}}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check: tests rc {tests_rc}, bench rc {bench_rc}, {report['seconds']} s -> {out / 'gpu_check.json'}")
EOF
