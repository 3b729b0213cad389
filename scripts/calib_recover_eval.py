"""Label-free recovery on the calibration images: does one epoch help or hurt on the suite?

For each digits model of the accuracy suite (and the demo on training 0), the default structured
prune at 70 % fewer MACs and the default 2:4, both `lsq+bn`, prune seed 0 (the suite's cached
recipe, `accuracy_suite.prune`), then one epoch of `recover()` on the suite's 128 calibration
images with no labels (KL to the dense model only: what `--recover-epochs` without `--train`
does), recovery seeds 0–2. Scored on the val split against zero-shot. One JSON row per recovery
to --out (appended).

    .venv/bin/python scripts/calib_recover_eval.py --trainings 0 1 2 --out docs/calib-recover.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accuracy_suite as suite_mod  # noqa: E402

CELLS = (("mp_fisher_split", 0.7), ("nm_obs_shrink", "2:4"))  # the defaults, at the suite's points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainings", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--split", choices=suite_mod.SPLITS, default="val")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from mpdeploy.prune.recover import RecoverConfig, recover

    torch.set_num_threads(2)
    with args.out.open("a") as out:
        for training in args.trainings:
            suite_mod.SETTINGS = dataclasses.replace(
                suite_mod.SETTINGS, train_seed=training, threads=2
            )
            models = list(suite_mod.train_suite.SUITE) + (["demo"] if training == 0 else [])
            for key in models:
                suite = suite_mod.load_model(key)
                data = suite_mod.held_out(key, args.split)
                calib = suite_mod.calibration(key)
                for method, target in CELLS:
                    pruned = suite_mod.prune(key, method, "lsq+bn", target, 0)
                    zero_shot = suite_mod.accuracy(pruned.model, data)
                    for seed in args.seeds:
                        start = time.perf_counter()
                        config = RecoverConfig(
                            epochs=1, seed=seed, progress=False, hflip=0.0, eval_images=64
                        )
                        result = recover(
                            copy.deepcopy(pruned.model),
                            suite.model,
                            calib,
                            suite.data_config,
                            config,
                            masks=pruned.masks,
                        )
                        row = {
                            "train_seed": training,
                            "model": key,
                            "method": method,
                            "target": str(target),
                            "split": args.split,
                            "recover_seed": seed,
                            "zero_shot": zero_shot,
                            "calib_epoch": suite_mod.accuracy(result.model, data),
                            "steps": result.record["steps"],
                            "seconds": round(time.perf_counter() - start, 1),
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        }
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
