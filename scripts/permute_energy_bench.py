"""N:M channel permutation: what reading every calibration image for the energies costs.

Times the permutation step of `sparsify` (`nm._permute`: the channel energies E[h²] of every
foldable group, one forward pass, then the folded permutation) on one timm model with random
weights (as `--weights none`), alternately with the energies from a seeded subset of 32 images
(the default until 2026-11-29) and from all `--images` (the default since: `permute_images=None`),
`--repeats` times each, interleaved, in one process. Random images: the cost of a forward does
not depend on what the pixels show. Writes every time and the medians to --out (JSON).

    nice -n 19 .venv/bin/python scripts/permute_energy_bench.py --model vit_base_patch16_224 \
        --images 68 --repeats 2 --out /tmp/permute_energy.json

(68: the images a ViT-B/16 N:M build reads of 256 under the default `calib_macs`.)
"""

from __future__ import annotations

import copy
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
from mpdeploy.prune.layout import layer_layouts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, model="vit_base_patch16_224", images=68)
    parser.add_argument("--subset", type=int, default=32, help="the capped variant's images")
    args = parser.parse_args(argv)
    import timm

    model = random_model(args.model, args.threads)
    shape = tuple(model.pretrained_cfg["input_size"])
    images = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(0))
    eligible = {lay.name: lay.eligible for lay in layer_layouts(model, 4)}
    variants = {f"{args.subset} images": args.subset, f"all {args.images}": None}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, cap in variants.items():
            config = nm.SparsityConfig(2, 4, permute_images=cap)
            work = copy.deepcopy(model)
            start = time.perf_counter()
            records, _ = nm._permute(work, images, config, eligible)
            times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat} {name}: {times[name][-1]:.1f} s", flush=True)
    result = {
        "model": args.model,
        "images": args.images,
        "threads": args.threads,
        "permuted_groups": sum(r.permuted for r in records),
        "seconds": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
