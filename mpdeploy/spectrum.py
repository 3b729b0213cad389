"""The analyze stage: an MP fit of every Linear/Conv2d weight of a model, spectrum.json and .png."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.fileio import atomic_path, read_json, write_json
from mpdeploy.mp import (
    BudgetConfig,
    MPFit,
    MPFitSettings,
    budget_config,
    fit_many,
    layer_budget_weights,
    mp_density,
    zscores,
)

SPECTRUM_JSON = "spectrum.json"
SPECTRUM_PNG = "spectrum.png"
_TYPE_COLOURS = {"attn": "tab:blue", "mlp": "tab:orange", "other": "tab:gray"}


@dataclass(frozen=True)
class LayerSpectrum:
    name: str
    kind: str  # "linear" | "conv"
    shape: tuple[int, ...]  # the weight as stored; the fit sees it as rows × cols
    layer_type: str  # "attn" | "mlp" | "other", for the layer-type budget regime
    fit: MPFit
    sigma_plus_z: float  # z-score of σ+ across all analysed layers (population std)
    budget_weight: float  # SEB weight at the report's sparsity; > 1 means pruned more

    def to_dict(self, include_eigenvalues: bool = False) -> dict[str, Any]:
        fit = self.fit.to_dict(include_eigenvalues)
        del fit["name"]
        head = {"name": self.name, "kind": self.kind, "shape": list(self.shape)}
        tail = {"sigma_plus_z": self.sigma_plus_z, "budget_weight": self.budget_weight}
        return {**head, "layer_type": self.layer_type, **tail, **fit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpectrum:
        return cls(
            name=data["name"],
            kind=data["kind"],
            shape=tuple(data["shape"]),
            layer_type=data["layer_type"],
            fit=MPFit.from_dict({**data, "name": data["name"]}),
            sigma_plus_z=data["sigma_plus_z"],
            budget_weight=data["budget_weight"],
        )


@dataclass(frozen=True)
class SpectrumReport:
    layers: tuple[LayerSpectrum, ...]  # in module (depth) order
    sparsity: float  # the sparsity the budget weights were computed for
    budget: BudgetConfig
    settings: MPFitSettings

    def layer(self, name: str) -> LayerSpectrum:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise UserError(f"no layer {name!r} in the spectrum; known: {self.names()[:5]}...")

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def budget_weights(self) -> dict[str, float]:
        return {layer.name: layer.budget_weight for layer in self.layers}

    def fits(self) -> dict[str, MPFit]:
        return {layer.name: layer.fit for layer in self.layers}

    def to_dict(self, highlight_layer: str | None = None) -> dict[str, Any]:
        """JSON form; eigenvalues are kept only for the highlighted layer, to redraw its plot."""
        return {
            "sparsity": self.sparsity,
            "budget": self.budget.to_dict(),
            "settings": self.settings.to_dict(),
            "highlight_layer": highlight_layer,
            "layers": [
                layer.to_dict(include_eigenvalues=layer.name == highlight_layer)
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpectrumReport:
        return cls(
            layers=tuple(LayerSpectrum.from_dict(d) for d in data["layers"]),
            sparsity=data["sparsity"],
            budget=BudgetConfig(**data["budget"]),
            settings=MPFitSettings(**data["settings"]),
        )


def layer_type_from_name(name: str) -> str:
    """The authors' rule: names containing "attn" are attention, "mlp" or ".fc" are MLP."""
    if "attn" in name:
        return "attn"
    if "mlp" in name or ".fc" in name:
        return "mlp"
    return "other"


def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and nn.Conv2d, in module order: the paper's "target layers"."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    }


def analyze_model(
    model: nn.Module,
    *,
    names: Iterable[str] | None = None,
    sparsity: float = 0.5,
    layer_types: Mapping[str, str] | None = None,
    budget_beta: float | None = None,
    s_d: float | None = None,
    **fit_kwargs: Any,
) -> SpectrumReport:
    """Fit MP to every target layer (or only `names`) and derive z-scores and budget weights.

    `fit_kwargs` are `fit_mp`'s (alpha, beta = the TW edge level, spike_quantile, hill_k,
    tw_term); `budget_beta` and `s_d` override the budget regime at `sparsity`.
    """
    modules = target_layers(model)
    if names is not None:
        wanted = list(names)
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            raise UserError(f"not a Linear/Conv2d layer of the model: {unknown[:5]}")
        modules = {n: modules[n] for n in modules if n in set(wanted)}
    if not modules:
        raise UserError("the model has no Linear or Conv2d layer to analyse")
    settings = MPFitSettings(**fit_kwargs)
    fits = fit_many({n: m.weight for n, m in modules.items()}, settings=settings)
    types = {n: layer_type_from_name(n) for n in modules} | dict(layer_types or {})
    config = budget_config(sparsity, beta=budget_beta, s_d=s_d)
    weights = layer_budget_weights(fits, sparsity, layer_types=types, config=config)
    z = zscores({n: f.sigma_plus for n, f in fits.items()})
    layers = tuple(
        LayerSpectrum(
            name=n,
            kind="linear" if isinstance(m, nn.Linear) else "conv",
            shape=tuple(m.weight.shape),
            layer_type=types[n],
            fit=fits[n],
            sigma_plus_z=z[n],
            budget_weight=weights[n],
        )
        for n, m in modules.items()
    )
    return SpectrumReport(layers, sparsity, config, settings)


def default_highlight(report: SpectrumReport) -> str:
    """The layer most worth a look: most spikes, then the worst MP fit."""
    best = max(report.layers, key=lambda layer: (layer.fit.spike_count, layer.fit.fit_error))
    return best.name


def write_spectrum(
    report: SpectrumReport, out_dir: str | Path, highlight_layer: str | None = None
) -> tuple[Path, Path]:
    """Write spectrum.json and spectrum.png into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    highlight = highlight_layer or default_highlight(report)
    report.layer(highlight)  # a clear error for an unknown name
    json_path = write_json(out_dir / SPECTRUM_JSON, report.to_dict(highlight))
    png_path = out_dir / SPECTRUM_PNG
    figure = spectrum_figure(report, highlight)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return json_path, png_path


def load_spectrum(path: str | Path) -> SpectrumReport:
    """Read a spectrum.json (or the build directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPECTRUM_JSON
    if not path.is_file():
        raise UserError(f"no spectrum file at {path}; run the analyze stage first")
    return SpectrumReport.from_dict(read_json(path))


def spectrum_figure(report: SpectrumReport, highlight: str):
    """Top: σ+ z-score and bulk fraction per layer across depth. Bottom: one layer's spectrum."""
    from matplotlib.figure import Figure  # Agg canvas; never touches the global backend

    figure = Figure(figsize=(12, 8.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(1, 1.1))
    _plot_depth(top, report, highlight)
    _plot_layer(bottom, report.layer(highlight), report.settings.spike_quantile)
    return figure


def _plot_depth(ax, report: SpectrumReport, highlight: str) -> None:
    x = np.arange(len(report.layers))
    colours = [_TYPE_COLOURS[layer.layer_type] for layer in report.layers]
    z = [layer.sigma_plus_z for layer in report.layers]
    ax.bar(x, z, color=colours, width=0.8)
    # Head-room above the bars and the bulk-fraction line for the legend.
    ax.set_ylim(min(-1.0, min(z) * 1.15), max(1.0, max(z)) * 1.45)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel("σ+ z-score (bars)")
    ax.set_xticks(x, [layer.name for layer in report.layers], rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(x) - 0.3)
    index = report.names().index(highlight)
    ax.axvspan(index - 0.5, index + 0.5, color="gold", alpha=0.35, zorder=0)
    twin = ax.twinx()
    bulk = [layer.fit.bulk_fraction for layer in report.layers]
    line = twin.plot(x, bulk, "k.-", linewidth=0.8, label="bulk fraction (right axis)")
    twin.set_ylabel("bulk fraction (line)")
    twin.set_ylim(0.0, 1.3)
    handles = [
        ax.bar([0], [0], color=c, label=f"{t} layers", width=0) for t, c in _TYPE_COLOURS.items()
    ]
    ax.legend(handles=[*handles, *line], loc="upper center", fontsize=8, ncols=4)
    ax.set_title(
        f"Per-layer MP edge σ+ (z-scored across {len(x)} layers) and share of eigenvalues in the "
        f"noise bulk; highlighted: {highlight}",
        fontsize=10,
    )


def _plot_layer(ax, layer: LayerSpectrum, spike_quantile: float) -> None:
    fit = layer.fit
    title = (
        f"{layer.name}: {fit.rows}×{fit.cols}, γ={fit.gamma:.3f}, σ̂²={fit.sigma_sq:.3g}, "
        f"fit error {fit.fit_error:.3f}, {fit.spike_count} spike(s)"
    )
    ax.set_title(title, fontsize=10)
    if fit.eigenvalues is None:
        ax.text(
            0.5, 0.5, "eigenvalues not stored for this layer", ha="center", transform=ax.transAxes
        )
        return
    lam = fit.eigenvalues
    # Spikes can sit far out; cut the axis so the bulk stays readable and say what was cut.
    x_max = max(min(lam[-1], 2.0 * fit.lambda_detect), fit.lambda_detect) * 1.08
    shown = lam[lam <= x_max]
    counts, edges = np.histogram(shown, bins=int(np.clip(len(lam) // 3, 15, 80)), range=(0, x_max))
    widths = np.diff(edges)
    ax.bar(
        edges[:-1],
        counts / (len(lam) * widths),
        width=widths,
        align="edge",
        alpha=0.5,
        color="tab:blue",
        label=f"eigenvalues of W·Wᵀ/in ({len(lam)})",
    )
    grid = np.linspace(0.0, x_max, 800)
    ax.plot(grid, mp_density(grid, fit.gamma, fit.sigma_sq), "k-", label="fitted MP density")
    ax.axvline(
        fit.lambda_plus,
        color="tab:green",
        linestyle="--",
        label=f"λ+ budget edge (σ+ = {fit.sigma_plus:.3g})",
    )
    ax.axvline(
        fit.lambda_detect,
        color="tab:red",
        linestyle=":",
        label=f"spike detection edge, TW₁ {spike_quantile:.0%} ({fit.spike_count} above)",
    )
    beyond = int((lam > x_max).sum())
    if beyond:
        ax.annotate(
            f"{beyond} more beyond → (largest λ = {lam[-1]:.3g})",
            xy=(0.98, 0.6),
            xycoords="axes fraction",
            ha="right",
            fontsize=9,
            color="tab:red",
        )
    ax.set_xlabel("eigenvalue λ (= singular value² / in_features)")
    ax.set_ylabel("density")
    ax.set_xlim(0.0, x_max)
    ax.legend(loc="upper right", fontsize=8)
