"""N:M `obs` + `lsq`: the re-fit's own statistics pass against the Grams OBS already captured.

Runs `sparsify` (2:4, `obs`, the default `lsq+bn`) on one timm model with random weights (as
`--weights none`) and builtin-photo calibration crops, alternately with the re-fit's statistics
taken from OBS's captured Grams (the default, `nm._compensate`) and with its own calibration pass
(the Gram path switched off), `--repeats` times each, interleaved, in one process. Writes the
stage timings, the layers that skipped the pass, and the relative logit difference of the two
results to --out (JSON).

    nice -n 19 .venv/bin/python scripts/nm_gram_bench.py --model vit_small_patch16_224 \
        --images 32 --repeats 2 --out /tmp/nm_gram.json
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _nm_bench import bench_parser, random_model  # noqa: E402

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)
from mpdeploy.prune import nm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, model="vit_small_patch16_224", images=32)
    args = parser.parse_args(argv)
    import timm

    from mpdeploy.data.calibration import load_calibration

    model = random_model(args.model, args.threads)
    config = timm.data.resolve_data_config({}, model=model)
    calib = load_calibration("builtin", args.images, config, seed=0).images
    shape = tuple(calib.shape[1:])
    original = nm._columns_in_weight_order
    runs: dict[str, list[dict]] = {"gram": [], "pass": []}
    results = {}
    for _ in range(args.repeats):
        for mode in ("gram", "pass"):
            nm._columns_in_weight_order = original if mode == "gram" else (lambda m: False)
            start = time.perf_counter()
            result = nm.sparsify(model, calib, nm.SparsityConfig(2, 4), input_shape=shape)
            total = time.perf_counter() - start
            layers = result.report["compensation"]["layers"]
            runs[mode].append(
                {
                    "sparsify_s": round(total, 2),
                    **result.report["timing_s"],
                    "layers_from_gram": sum("statistics" in e for e in layers.values()),
                    "layers": len(layers),
                }
            )
            results[mode] = result.model
            print(mode, runs[mode][-1], flush=True)
    nm._columns_in_weight_order = original
    with torch.no_grad():
        a, b = results["gram"](calib[:8]), results["pass"](calib[:8])
    record = {
        "model": args.model,
        "images": args.images,
        "threads": args.threads,
        "runs": runs,
        "median_compensation_s": {
            m: statistics.median(r["compensation_s"] for r in rs) for m, rs in runs.items()
        },
        "median_sparsify_s": {
            m: statistics.median(r["sparsify_s"] for r in rs) for m, rs in runs.items()
        },
        "relative_logit_difference": float((a - b).norm() / b.norm()),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in record if k != "runs"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
