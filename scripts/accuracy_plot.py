"""docs/images/accuracy-<split>.png: the accuracy suite's cells as a picture, from its payload.

One panel per model: top-1 (efficientnet-lite0: top-1 agreement) as a percentage of the dense
model's, against the MAC reduction, for the default structured criterion, magnitude (both with
the default compensation) and Torch-Pruning's better importance at each point; solid lines
zero-shot, dashed after one recovery epoch (the mean over recovery seeds). Where the digits
models were trained more than once (`train_suite.py --seed N`), a band spans the default's
zero-shot values over the trainings. The last panel: 2:4 sparsity, the default N:M method
against magnitude. Nothing is measured here; the figure reads docs/accuracy.json:

    python scripts/accuracy_plot.py                      # test split → docs/images/accuracy-test.png
    python scripts/accuracy_plot.py --split val --out /tmp/val.png

`scripts/accuracy_suite.py --doc` draws it too, with the tables, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import accuracy_suite as suite
import numpy as np
from accuracy_suite import NM_TARGET, TARGETS, TP_METHODS

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / "docs" / "accuracy.json"
CNN_FLOOR = 90.0  # issue 11: ≥ 90 % of dense at 70 % zero-shot on every CNN
# panel order: the ViTs, then the CNNs by size, the real-weights network last; others after
ORDER = ("demo", "vit_t", "vit_s", "convnextv2_n", "resnet18_n", "resnet26_n", "efficientnet_lite0")


def image_path(split: str) -> Path:
    return ROOT / "docs" / "images" / f"accuracy-{split}.png"


def _means(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """(model, method, compensate, target, recover_epochs) → mean top-1 over seeds (the
    suite's own `summarise`, so the picture and the tables average alike)."""
    return {key: mean for key, (mean, _std, _n) in suite.summarise(records).items()}


def _dense(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    return {r["model"]: r["dense_top1"] for r in records if "dense_top1" in r}


def series(
    payload: dict[str, Any], split: str, method: str, compensate: str, nm_method: str
) -> dict[str, dict[str, Any]]:
    """Per model, what the figure draws, in percent of dense (None where not measured):
    default / magnitude / tp_best, each {epochs: [value at 0, 30, 50, 70 %]}; `band`, the
    default's zero-shot [low, high] per target over every training; `nm`, {method: {epochs: v}}."""
    records = payload["splits"][split]
    means, dense = _means(records), _dense(records)
    others = [t[split] for t in payload.get("trainings", {}).values() if split in t]
    out: dict[str, dict[str, Any]] = {}
    found = dict.fromkeys(r["model"] for r in records)
    for model in sorted(found, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        if model not in dense:
            continue
        ref = dense[model]

        def pct(value, ref=ref):
            return None if value is None else 100.0 * value / ref

        def line(values):  # values(target, epochs) → top-1 or None
            return {e: [100.0, *(pct(values(t, e)) for t in TARGETS)] for e in (0, 1)}

        def ours(name, model=model):
            return line(lambda at, epochs: means.get((model, name, compensate, at, epochs)))

        def tp_best(target, e, model=model):
            found = [means.get((model, m, "none", target, e)) for m in TP_METHODS]
            found = [v for v in found if v is not None]
            return max(found) if found else None

        band = []
        for target in TARGETS:
            values = [means.get((model, method, compensate, target, 0))]
            for run in others:
                run_means, run_dense = _means(run), _dense(run)
                got = run_means.get((model, method, compensate, target, 0))
                if got is not None and model in run_dense:
                    values.append(got * ref / run_dense[model])  # as a share of its own dense
            values = [pct(v) for v in values if v is not None]
            band.append((min(values), max(values)) if len(values) > 1 else None)
        nm = {}
        for name in (nm_method, "magnitude"):
            got = {}
            for e in (0, 1):
                value = means.get((model, f"nm_{name}", compensate, NM_TARGET, e))
                if value is None:
                    value = means.get((model, f"nm_{name}", "none", NM_TARGET, e))
                got[e] = pct(value)
            nm[name] = got
        out[model] = {
            "default": ours(method),
            "magnitude": ours("magnitude"),
            "tp_best": line(tp_best),
            "band": band,
            "nm": nm,
            "trainings": 1 + sum(model in _dense(run) for run in others),
        }
    return out


def draw(data: dict[str, dict[str, Any]], split: str, names: dict[str, str], out: Path) -> Path:
    """The figure (Agg canvas; the global matplotlib backend is never touched)."""
    from matplotlib.figure import Figure

    models = list(data)
    cols = 4
    rows = -(-(len(models) + 1) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = [0, *(100 * t for t in TARGETS)]
    styles = {
        "default": ("C0", f"default ({names['method']} + {names['compensate']})"),
        "magnitude": ("C1", f"magnitude + {names['compensate']}"),
        "tp_best": ("C2", "Torch-Pruning, better importance"),
    }
    for ax, model in zip(axes, models, strict=False):
        got = data[model]
        band = got["band"]
        if any(b is not None for b in band):
            lo = [100.0, *(b[0] if b else np.nan for b in band)]
            hi = [100.0, *(b[1] if b else np.nan for b in band)]
            ax.fill_between(
                x,
                lo,
                hi,
                color="C0",
                alpha=0.15,
                lw=0,
                label="default zero-shot, range over the trainings",
            )
        for key, (color, label) in styles.items():
            for epochs, dash in ((0, "-"), (1, "--")):
                ys = [np.nan if v is None else v for v in got[key][epochs]]
                if all(np.isnan(ys[1:])):
                    continue
                ax.plot(
                    x,
                    ys,
                    dash,
                    color=color,
                    marker="o" if epochs == 0 else None,
                    lw=2.2 if key == "default" else 1.4,
                    label=label if epochs == 0 else f"{label}, +1 epoch",
                )
        ax.axhline(CNN_FLOOR, color="0.6", lw=0.8, ls=":")
        ax.set_title(model + ("" if got["trainings"] == 1 else f" ({got['trainings']} trainings)"))
        ax.set_xticks(x)
        ax.set_ylim(0, 108)
        ax.grid(alpha=0.3)
        ax.set_xlabel("MAC reduction (%)")
        ax.set_ylabel("top-1, % of dense")
    # the N:M panel: what 2:4 loses against dense, default method against magnitude; a symlog
    # axis, because the digits models lose a point or less and efficientnet-lite0 half
    ax = axes[len(models)]
    width = 0.2
    nm_names = list(next(iter(data.values()))["nm"]) if data else []
    for i, name in enumerate(nm_names):
        for epochs, hatch in ((0, None), (1, "//")):
            lost = [data[m]["nm"][name][epochs] for m in models]
            pos = np.arange(len(models)) + (2 * i + epochs - 1.5) * width
            ax.bar(
                pos,
                [0 if v is None else 100.0 - v for v in lost],
                width,
                color=f"C{3 + i}",
                hatch=hatch,
                edgecolor="white",
                label=f"2:4 {name}" + (", +1 epoch" if epochs else ""),
            )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(np.arange(len(models)), models, rotation=30, ha="right")
    ax.set_title("2:4 sparsity: top-1 lost (lower is better)")
    ax.set_ylabel("top-1 lost, points of % of dense")
    ax.legend(fontsize=7, loc="upper left")
    for extra in axes[len(models) + 1 :]:
        extra.set_visible(False)
    legend: dict[str, Any] = {}  # every panel's lines, once each (the demo has no band)
    for panel in axes[: len(models)]:
        for handle, label in zip(*panel.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(
        f"Accuracy suite, {split} split: what each pruning keeps of the dense model "
        "(dotted: 90 %, the CNN target at 70 %)"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def plot(payload: dict[str, Any], split: str, names: dict[str, str], out: Path) -> dict:
    """Draw `split` of the payload into `out`; returns the plotted values (percent of dense)."""
    data = series(payload, split, names["method"], names["compensate"], names["nm_method"])
    draw(data, split, names, out)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload", type=Path, default=PAYLOAD)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    payload = json.loads(args.payload.read_text())
    out = args.out or image_path(args.split)
    plot(payload, args.split, suite.default_names(), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
