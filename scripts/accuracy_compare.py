"""Do the suite's choices replicate? Two runs of the accuracy suite, side by side.

The digits models are re-trained from a seed, but their weights differ from CPU to CPU (float
summation order), so two machines give two trainings of every model: two samples of "a trained
model of this family", on which the defaults chosen on one can be checked on the other.

For every (split, model, MAC target, recovery epochs) that both runs measured, the default
(`PruneConfig`'s criterion + compensation for structured pruning, the default N:M method for
2:4; read from the code, or `--default`) is set against the best other method measured in
**both** runs at the same point (same compensation, or `none` for Torch-Pruning); the margin is
in held-out images.

    python scripts/accuracy_compare.py --a old.json --b docs/accuracy.json --out cmp.json

`--a`/`--b` take a `docs/accuracy.json` payload or a results directory
(`engines/suite/results`). Prints a markdown table per split and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_suite  # noqa: E402

NM_PREFIX = "nm_"


def load_run(source: Path, split: str) -> list[dict[str, Any]]:
    """The records of `split`: from an accuracy.json payload or a results directory."""
    if source.is_dir():
        return accuracy_suite.load_records(split, source)
    return json.loads(source.read_text())["splits"].get(split, [])


def default_methods(method: str | None = None) -> tuple[str, str, str]:
    from mpdeploy.prune.nm import SparsityConfig

    chosen = accuracy_suite.defaults()
    return method or chosen["method"], chosen["compensate"], NM_PREFIX + SparsityConfig.method


def comparable(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """(model, method, compensate, target, epochs) → mean top-1 over the stored seeds."""
    return {k: v[0] for k, v in accuracy_suite.summarise(records).items()}


def compare(a: list[dict], b: list[dict], method: str | None = None) -> list[dict[str, Any]]:
    method, comp, nm_method = default_methods(method)
    stats = comparable(a), comparable(b)
    images = {r["model"]: r["eval_images"] for r in a + b if "eval_images" in r}
    rows = []
    points = sorted(
        {(k[0], k[3], k[4]) for k in stats[0] if k[1] in (method, nm_method) and k[2] == comp}
        & {(k[0], k[3], k[4]) for k in stats[1] if k[1] in (method, nm_method) and k[2] == comp},
        key=str,
    )
    for model, target, epochs in points:
        ours = nm_method if isinstance(target, str) else method
        mine = (model, ours, comp, target, epochs)
        if mine not in stats[0] or mine not in stats[1]:
            continue
        peers = [
            k
            for k in stats[0]
            if k in stats[1]
            and k[0] == model
            and k[3] == target
            and k[4] == epochs
            and k[1] != ours
            and (k[2] == comp or (k[2] == "none" and k[1] in accuracy_suite.TP_METHODS))
        ]
        row: dict[str, Any] = {
            "model": model,
            "target": target,
            "recover_epochs": epochs,
            "default": ours,
            "images": images.get(model),
        }
        for name, run in zip("ab", stats, strict=True):
            best = max(peers, key=run.__getitem__, default=None)
            row[f"{name}_default"] = run[mine]
            row[f"{name}_best_other"] = None if best is None else f"{best[1]}/{best[2]}"
            row[f"{name}_margin"] = (
                None if best is None else (run[mine] - run[best]) * images[model]
            )
        row["peers"] = len(peers)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    def margin(value):
        return "–" if value is None else f"{value:+.1f}"

    lines = [
        "| model | target | +ep | default A | best other A | margin A | default B | "
        "best other B | margin B | peers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = r["target"] if isinstance(r["target"], str) else f"{r['target']:.0%}"
        lines.append(
            f"| {r['model']} | {target} | {r['recover_epochs']} | {r['a_default']:.1%} | "
            f"{r['a_best_other'] or '–'} | {margin(r['a_margin'])} | {r['b_default']:.1%} | "
            f"{r['b_best_other'] or '–'} | {margin(r['b_margin'])} | {r['peers']} |"
        )
    return lines


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How often the default is ahead, within one image, or behind by more, in each run."""
    out = {}
    for name in "ab":
        margins = [r[f"{name}_margin"] for r in rows if r[f"{name}_margin"] is not None]
        out[f"{name}_ahead_or_tied"] = sum(m >= -1e-9 for m in margins)
        out[f"{name}_behind_within_1_image"] = sum(-1 - 1e-9 <= m < -1e-9 for m in margins)
        out[f"{name}_behind_more"] = sum(m < -1 - 1e-9 for m in margins)
    both = [r for r in rows if r["a_margin"] is not None and r["b_margin"] is not None]
    out["points"] = len(both)
    out["behind_more_in_both"] = sum(
        r["a_margin"] < -1 - 1e-9 and r["b_margin"] < -1 - 1e-9 for r in both
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="accuracy.json or results dir")
    parser.add_argument("--b", type=Path, required=True, help="accuracy.json or results dir")
    parser.add_argument("--splits", nargs="+", default=list(accuracy_suite.SPLITS))
    parser.add_argument("--out", type=Path, default=None, help="JSON of every compared point")
    parser.add_argument(
        "--models", nargs="+", default=None, help="only these models (default: every model)"
    )
    parser.add_argument(
        "--default", default=None, help="the structured criterion to check (default: PruneConfig's)"
    )
    args = parser.parse_args(argv)
    for path in (args.a, args.b):
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    payload = {}
    for split in args.splits:
        runs = [load_run(path, split) for path in (args.a, args.b)]
        if args.models:
            runs = [[r for r in run if r["model"] in args.models] for run in runs]
        rows = compare(*runs, method=args.default)
        payload[split] = {"rows": rows, "summary": summary(rows)}
        print(f"\n## {split}: A = {args.a}, B = {args.b}\n")
        print("\n".join(markdown(rows)))
        print(f"\n{payload[split]['summary']}")
    if args.out:
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
