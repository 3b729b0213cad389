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
    python scripts/accuracy_compare.py --a engines/suite/results \
        --b engines/suite/results/train-seed-1 --also engines/suite/results/train-seed-2

With `--also` (more runs: C, D, ...) the peers are the methods every run measured, and the
summary counts the points where the default is behind by more than one image in all of them.

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


NAMES = "abcdefgh"  # the runs' names in a row's keys: a_default, b_margin, c_margin, ...


def compare(
    a: list[dict], b: list[dict], *more: list[dict], method: str | None = None
) -> list[dict[str, Any]]:
    """Per point every run measured: the default and its margin over the best other method that
    **every** run measured there (runs a, b, then `more` as c, d, ...)."""
    runs = (a, b, *more)
    if len(runs) > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} runs")
    method, comp, nm_method = default_methods(method)
    stats = [comparable(run) for run in runs]
    images = {r["model"]: r["eval_images"] for run in runs for r in run if "eval_images" in r}
    rows = []
    points = set.intersection(
        *(
            {(k[0], k[3], k[4]) for k in st if k[1] in (method, nm_method) and k[2] == comp}
            for st in stats
        )
    )
    for model, target, epochs in sorted(points, key=str):
        ours = nm_method if isinstance(target, str) else method
        mine = (model, ours, comp, target, epochs)
        if any(mine not in st for st in stats):
            continue
        peers = [
            k
            for k in stats[0]
            if all(k in st for st in stats[1:])
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
        for name, run in zip(NAMES, stats, strict=False):
            best = max(peers, key=run.__getitem__, default=None)
            row[f"{name}_default"] = run[mine]
            row[f"{name}_best_other"] = None if best is None else f"{best[1]}/{best[2]}"
            row[f"{name}_margin"] = (
                None if best is None else (run[mine] - run[best]) * images[model]
            )
        row["peers"] = len(peers)
        rows.append(row)
    return rows


def _run_names(rows: list[dict[str, Any]]) -> str:
    return "".join(n for n in NAMES if rows and f"{n}_margin" in rows[0]) or "ab"


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    def margin(value):
        return "–" if value is None else f"{value:+.1f}"

    names = _run_names(rows)
    head = ["model", "target", "+ep"]
    for n in names.upper():
        head += [f"default {n}", f"best other {n}", f"margin {n}"]
    lines = ["| " + " | ".join([*head, "peers"]) + " |", "|---" * (len(head) + 1) + "|"]
    for r in rows:
        target = r["target"] if isinstance(r["target"], str) else f"{r['target']:.0%}"
        cells = [r["model"], target, str(r["recover_epochs"])]
        for n in names:
            cells += [
                f"{r[f'{n}_default']:.1%}",
                r[f"{n}_best_other"] or "–",
                margin(r[f"{n}_margin"]),
            ]
        lines.append("| " + " | ".join([*cells, str(r["peers"])]) + " |")
    return lines


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How often the default is ahead, within one image, or behind by more, in each run; and at
    how many points it is behind by more than one image in every run."""
    out = {}
    names = _run_names(rows)
    for name in names:
        margins = [r[f"{name}_margin"] for r in rows if r[f"{name}_margin"] is not None]
        out[f"{name}_ahead_or_tied"] = sum(m >= -1e-9 for m in margins)
        out[f"{name}_behind_within_1_image"] = sum(-1 - 1e-9 <= m < -1e-9 for m in margins)
        out[f"{name}_behind_more"] = sum(m < -1 - 1e-9 for m in margins)
    every = [r for r in rows if all(r[f"{n}_margin"] is not None for n in names)]
    out["points"] = len(every)
    behind = sum(all(r[f"{n}_margin"] < -1 - 1e-9 for n in names) for r in every)
    out["behind_more_in_all"] = behind
    if len(names) == 2:
        out["behind_more_in_both"] = behind
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="accuracy.json or results dir")
    parser.add_argument("--b", type=Path, required=True, help="accuracy.json or results dir")
    parser.add_argument(
        "--also",
        nargs="+",
        type=Path,
        default=[],
        help="more runs (C, D, ...: e.g. engines/suite/results/train-seed-2); peers are the "
        "methods every run measured",
    )
    parser.add_argument("--splits", nargs="+", default=list(accuracy_suite.SPLITS))
    parser.add_argument("--out", type=Path, default=None, help="JSON of every compared point")
    parser.add_argument(
        "--models", nargs="+", default=None, help="only these models (default: every model)"
    )
    parser.add_argument(
        "--default", default=None, help="the structured criterion to check (default: PruneConfig's)"
    )
    args = parser.parse_args(argv)
    paths = [args.a, args.b, *args.also]
    if len(paths) > len(NAMES):
        print(f"error: at most {len(NAMES)} runs, got {len(paths)}", file=sys.stderr)
        return 2
    for path in paths:
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    payload = {}
    for split in args.splits:
        runs = [load_run(path, split) for path in paths]
        if args.models:
            runs = [[r for r in run if r["model"] in args.models] for run in runs]
        rows = compare(*runs, method=args.default)
        payload[split] = {"rows": rows, "summary": summary(rows)}
        named = ", ".join(f"{n} = {p}" for n, p in zip(NAMES.upper(), paths, strict=False))
        print(f"\n## {split}: {named}\n")
        print("\n".join(markdown(rows)))
        print(f"\n{payload[split]['summary']}")
    if args.out:
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
