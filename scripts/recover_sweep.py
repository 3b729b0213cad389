"""Recovery-recipe sweep on the accuracy suite's val split (issue 11: one epoch at 70 % must count).

Prunes each model once (the suite's own `prune`, cached under engines/suite/sweep/), then runs
`mpdeploy.prune.recover.recover` with each named `RecoverConfig` variant on the fit split exactly as
the suite's `recovered` does, and appends one JSON line per (variant, model, seed) to
engines/suite/sweep/recover_sweep.jsonl with the val top-1.

    python scripts/recover_sweep.py --models vit_t resnet26_n --variants base bs16 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_suite as s  # noqa: E402

from mpdeploy.prune.recover import RecoverConfig, recover  # noqa: E402

# the recipe before this sweep (RecoverConfig's defaults until 2026-11-27 20:15 UTC)
OLD = dict(lr=1e-4, batch_size=64, warmup_fraction=0.1, crop_scale=(0.6, 1.0))
# each variant: changes to OLD, on top of the suite's settings (epochs=1, hflip=0, eval_images=64)
VARIANTS: dict[str, dict] = {
    "old": {},
    "base": None,  # whatever RecoverConfig's defaults are now
    "bs16": dict(batch_size=16),
    "bs16_lr3e-4": dict(batch_size=16, lr=3e-4),
    "bs16_lr1e-3": dict(batch_size=16, lr=1e-3),
    "bs32_lr3e-4": dict(batch_size=32, lr=3e-4),
    "bs16_lr3e-4_kd": dict(batch_size=16, lr=3e-4, alpha=1.0),
    "bs16_lr3e-4_t1": dict(batch_size=16, lr=3e-4, tau=1.0),
    "bs16_lr3e-4_t4": dict(batch_size=16, lr=3e-4, tau=4.0),
    "bs16_lr3e-4_bnfrozen": dict(batch_size=16, lr=3e-4, freeze_norms=True),
    "bs8_lr3e-4": dict(batch_size=8, lr=3e-4),
    "bs16_lr3e-4_noaug": dict(batch_size=16, lr=3e-4, crop_scale=(1.0, 1.0)),
    "bs16_lr3e-4_ema": dict(batch_size=16, lr=3e-4, ema=0.99),
    "bs16_lr3e-4_ema95": dict(batch_size=16, lr=3e-4, ema=0.95),
    "bs8_lr1e-3": dict(batch_size=8, lr=1e-3),
    "bs8_lr1e-4": dict(batch_size=8, lr=1e-4),
    "bs16_lr3e-4_noaug_bnfrozen": dict(
        batch_size=16, lr=3e-4, crop_scale=(1.0, 1.0), freeze_norms=True
    ),
    "bs16_lr3e-4_scale85": dict(batch_size=16, lr=3e-4, crop_scale=(0.85, 1.0)),
    "bs8_lr3e-4_bnfrozen": dict(batch_size=8, lr=3e-4, freeze_norms=True),
    "bs16_lr3e-4_scale85_bnfrozen": dict(
        batch_size=16, lr=3e-4, crop_scale=(0.85, 1.0), freeze_norms=True
    ),
}

OUT = s.train_suite.CACHE_DIR / "sweep"


def pruned(key: str, method: str, target) -> s.Pruned:
    path = OUT / f"{key}__{method}__{target}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    result = s.prune(key, method, "lsq+bn", target, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def run(key: str, method: str, target, variant: str, seed: int) -> dict:
    suite = s.load_model(key)
    data = s.held_out(key, "val")
    p = pruned(key, method, target)
    fields = {f.name for f in dataclasses.fields(RecoverConfig)}
    changes = VARIANTS[variant]
    overrides = {} if changes is None else {**OLD, **changes}
    if set(overrides) - fields:
        raise SystemExit(f"{variant}: RecoverConfig lacks {set(overrides) - fields}")
    config = RecoverConfig(
        **{**dict(epochs=1, seed=seed, progress=False, hflip=0.0, eval_images=64), **overrides}
    )
    student = copy.deepcopy(p.model)
    start = time.perf_counter()
    result = recover(student, suite.model, s.fit_folder(), suite.data_config, config, masks=p.masks)
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "model": key,
        "method": method,
        "target": target,
        "seed": seed,
        "zero_shot": s.accuracy(p.model, data),
        "top1": s.accuracy(result.model, data),
        "dense": s.accuracy(suite.model, data),
        "steps": result.record["steps"],
        "seconds": round(seconds, 1),
        "config": dataclasses.asdict(config),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(s.train_suite.SUITE))
    parser.add_argument("--variants", nargs="+", default=["base"])
    parser.add_argument("--method", default="mp_fisher_taylor")
    parser.add_argument("--target", default="0.7")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = args.target if ":" in args.target else float(args.target)
    for seed in args.seeds:
        for variant in args.variants:
            for key in args.models:
                rec = run(key, args.method, target, variant, seed)
                OUT.mkdir(parents=True, exist_ok=True)
                with (OUT / "recover_sweep.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(
                    f"{variant:22s} {key:13s} {args.method} {target} s{seed}: "
                    f"{rec['zero_shot']:.3f} -> {rec['top1']:.3f} (dense {rec['dense']:.3f}) "
                    f"{rec['steps']} steps {rec['seconds']}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
