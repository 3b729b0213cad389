"""Top-1 of the bundled demo ViT pruned by each criterion at several MAC targets, ± 1 recovery epoch.

    python scripts/prune_eval.py                      # mp, magnitude, random (3 seeds), taylor
    python scripts/prune_eval.py --targets 0.5 --recover-epochs 0
    python scripts/prune_eval.py --validation 300 --methods mp mp_absolute --recover-epochs 0

Dense and pruned models are scored on the digits held-out test split (360 images), preprocessed
with the model's eval transform; calibration is the builtin 256-image digits batch. Recovery is
`recover(..., train="demo")` (the digits train split only). Writes JSON and the results block of
docs/pruning.md.

`--validation N` scores on the LAST N images of the digits *train* split instead (for choosing
between criterion variants without touching the test split; the calibration batch is drawn from
the train split too and may overlap it). Its JSON goes under the "validation" key of --out-json
and its table into the `prune-eval-validation` block of the doc; the test results are kept.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)

MARKER = "prune-eval"
VALIDATION_MARKER = "prune-eval-validation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights", default="hub", help="'hub' = the bundled demo weights, or a file"
    )
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+", default=["mp", "magnitude", "random", "taylor"])
    parser.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recover-epochs", type=int, default=1, help="0 skips recovery")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        metavar="N",
        help="score on the last N digits train images (model selection), not the test split",
    )
    parser.add_argument("--out-json", type=Path, default=REPO_ROOT / "docs" / "pruning-eval.json")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "pruning.md")
    return parser.parse_args(argv)


def replace_block(doc: Path, marker: str, body: str) -> None:
    """Replace the text between `<!-- marker:begin -->` and `<!-- marker:end -->` in `doc`."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = doc.read_text() if doc.is_file() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def held_out_set(data_config: dict, validation: int = 0):
    """The digits test split, or (validation > 0) the last `validation` train images."""
    import torch

    from mpdeploy.data.calibration import eval_transform
    from mpdeploy.data.digits import digits_pil_images, load_digits_split

    transform = eval_transform(data_config)
    split = "train" if validation else "test"
    _, labels = load_digits_split(split)
    pil = digits_pil_images(split)
    if validation:
        pil, labels = pil[-validation:], labels[-validation:]
    images = torch.stack([transform(img) for img in pil])
    return images, torch.from_numpy(labels)


def top1(model, images, labels) -> float:
    import torch

    with torch.no_grad():
        predictions = torch.cat([model(b).argmax(1) for b in images.split(64)])
    return float((predictions == labels).float().mean())


def run(args: argparse.Namespace) -> dict:
    import torch

    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.models import create_model
    from mpdeploy.models.demo import DEMO_MODEL
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.prune.recover import RecoverConfig, recover
    from mpdeploy.spectrum import analyze_model

    torch.set_num_threads(args.threads)
    loaded = create_model(DEMO_MODEL, weights=args.weights)
    dense = loaded.model
    calib = load_calibration("builtin", args.calib_size, loaded.data_config, model_name=DEMO_MODEL)
    images, labels = held_out_set(loaded.data_config, args.validation)
    rows = []
    dense_top1 = top1(dense, images, labels)
    print(f"dense top-1 {dense_top1:.4f}", flush=True)
    for target in args.targets:
        spectrum = analyze_model(dense, sparsity=target)
        for method in args.methods:
            seeds = args.random_seeds if method == "random" else [0]
            for seed in seeds:
                start = time.perf_counter()
                config = PruneConfig(target_macs=target, method=method, seed=seed)
                result = prune_model(dense, calib.images, spectrum, config, input_shape=(3, 32, 32))
                row = {
                    "target": target,
                    "method": method,
                    "seed": seed,
                    "top1": top1(result.model, images, labels),
                    **{
                        k: result.headline[k]
                        for k in (
                            "mac_reduction",
                            "certified_fraction",
                            "top1_agreement_calib",
                            "logit_perturbation_median",
                            "pruned_params",
                        )
                    },
                    "widths": {g["name"]: g["width_after"] for g in result.plan["groups"]},
                }
                if args.recover_epochs:
                    recovered = recover(
                        copy.deepcopy(result.model),
                        dense,
                        "demo",
                        loaded.data_config,
                        RecoverConfig(epochs=args.recover_epochs, seed=seed, progress=False),
                    )
                    row["top1_recovered"] = top1(recovered.model, images, labels)
                    row["recover_loss_last_epoch"] = recovered.record["loss_per_epoch"][-1]
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "weights": loaded.weights_source,
        "calibration": {"origin": calib.origin, "count": len(calib), "sha256": calib.sha256},
        "eval_set": (
            f"digits train[-{args.validation}:] (validation)" if args.validation else "digits test"
        ),
        "test_images": int(labels.numel()),
        "dense_top1": dense_top1,
        "recover_epochs": args.recover_epochs,
        "command": " ".join(["python", "scripts/prune_eval.py", *(sys.argv[1:])]),
        "rows": rows,
    }


def summarise(rows: list[dict], key: str) -> dict[tuple[float, str], tuple[float, float, int]]:
    """(target, method) → (mean, std, runs) of `key` over seeds."""
    out = {}
    for target in sorted({r["target"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows):
            values = [
                r[key] for r in rows if r["target"] == target and r["method"] == method and key in r
            ]
            if values:
                out[(target, method)] = (float(np.mean(values)), float(np.std(values)), len(values))
    return out


def where(payload: dict) -> str:
    if payload.get("eval_set", "digits test") == "digits test":
        return "held-out digits (test split)"
    return "VALIDATION images (the last ones of the digits train split; not the test split)"


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    plain = summarise(rows, "top1")
    recovered = summarise(rows, "top1_recovered")
    certified = summarise(rows, "certified_fraction")
    reduction = summarise(rows, "mac_reduction")
    lines = [
        f"Measured {payload['date']}: bundled demo ViT ({payload['weights']} weights), "
        f"dense top-1 **{payload['dense_top1']:.2%}** on the {payload['test_images']} "
        f"{where(payload)}; calibration {payload['calibration']['count']} builtin digits images; "
        f"recovery {payload['recover_epochs']} epoch(s) of KD on the digits train split. "
        "Random: mean ± std over seeds. Command: `" + payload["command"] + "`.",
        "",
        "| target | method | MAC reduction | top-1 (no recovery) | top-1 (+recovery) | certified (calib) |",
        "|---|---|---|---|---|---|",
    ]
    for (target, method), (mean, std, runs) in plain.items():

        def fmt(stats):
            if stats is None:
                return "–"
            m, s, n = stats
            return f"{m:.2%}" + (f" ± {s:.2%}" if n > 1 else "")

        lines.append(
            f"| {target:.0%} | {method}{f' ({runs} seeds)' if runs > 1 else ''} | "
            f"{reduction[(target, method)][0]:.1%} | {fmt((mean, std, runs))} | "
            f"{fmt(recovered.get((target, method)))} | {fmt(certified.get((target, method)))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload = run(args)
    previous = json.loads(args.out_json.read_text()) if args.out_json.is_file() else {}
    if args.validation:
        stored = {**previous, "validation": payload} if previous else {"validation": payload}
        marker = VALIDATION_MARKER
    else:
        stored = (
            {**payload, "validation": previous["validation"]}
            if "validation" in previous
            else payload
        )
        marker = MARKER
    args.out_json.write_text(json.dumps(stored, indent=2) + "\n")
    replace_block(args.doc, marker, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
