"""Process CPU-seconds of the 2:4 projection of one ViT-B/16 block's four Linears: OBS vs CAST.

Shapes of `vit_base_patch16_224` block Linears (qkv 2304×768, proj 768×768, fc1 3072×768,
fc2 768×3072); weights N(0, 0.02²) and a Hessian from 4,096 correlated synthetic rows (the
projection's cost does not depend on the values). Only the projection is timed (`obs_project`,
`cast.project`), not the Gram capture or the `lsq` re-fit. CPU seconds of this process
(`time.process_time`, all threads), so the figure is comparable on a shared machine.

    python scripts/obs_cost.py [--threads 1] [--out obs_cost.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mpdeploy.prune import cast
from mpdeploy.prune.obs import obs_project

LAYERS = {"attn.qkv": (2304, 768), "attn.proj": (768, 768), "mlp.fc1": (3072, 768)}
LAYERS["mlp.fc2"] = (768, 3072)


def synthetic(out: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    x = torch.randn(4096, features, generator=g) @ mix + 0.1 * torch.randn(
        4096, features, generator=g
    )
    weight = 0.02 * torch.randn(out, features, generator=g)
    return weight, x.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for i, (name, (out, features)) in enumerate(LAYERS.items()):
        weight, x = synthetic(out, features, i)
        hessian = x.T @ x / x.shape[0]
        h = x.reshape(x.shape[0], 1, -1, 4)  # (rows, pixels=1, G, 4): a Linear's groups
        moments = torch.einsum("rpgi,rpgj->pgij", h, h) / x.shape[0]
        start = time.process_time()
        cast.project(weight, moments, 2, 4)
        cast_s = time.process_time() - start
        start = time.process_time()
        obs_project(weight, hessian, 2, 4, rows=x.shape[0])
        obs_s = time.process_time() - start
        row = {"layer": name, "shape": [out, features], "cast_cpu_s": cast_s, "obs_cpu_s": obs_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: round(sum(r[k] for r in rows), 2) for k in ("cast_cpu_s", "obs_cpu_s")}
    print(json.dumps({"block": total, "threads": args.threads}))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"layers": rows, "block": total, "threads": args.threads}, handle, indent=1)


if __name__ == "__main__":
    main()
