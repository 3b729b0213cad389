"""Closed-form compensation after removal: re-fit what reads the cut channels, no training.

After structured pruning (or an N:M projection) each affected layer ℓ of the pruned model reads
inputs x̂ that lack some channels (or weight slots). Three switchable corrections, combined with
'+' (`--compensate lsq+bn`):

- `bias`: add E[y_ℓ(dense)] − E[ŷ_ℓ(pruned)] to the layer's bias, i.e. the removed channels'
  calibration mean activation × their weight columns (plus any mean shift upstream). A layer with
  no bias folds it into the BatchNorm right after it (running_mean −= δ, exact in eval mode);
  where neither exists the layer is left alone and the record says so.
- `lsq`: least squares of the layer's kept weights (and bias) so its output on the calibration
  rows stays closest to the dense layer's: min ‖[x̂, 1] β − y‖² + λ‖β‖², with x̂ the pruned
  network's input rows (tokens of a Linear, im2col patches of a Conv2d: exact, not restricted to
  1×1) and y the dense layer's output on the same images and rows. X̂ᵀX̂ and X̂ᵀY are summed in one
  streaming pass in float64 (memory does not grow with the calibration set); λ = ridge × the mean
  diagonal of X̂ᵀX̂. With an N:M mask each output row is solved on its own kept slots.
- `bn`: BatchNorm running statistics corrected for the shift that pruning causes (CNNs; none in
  ViTs), measured on the calibration images *relative to the dense network on the same images*:
  running_mean ← dense running_mean + (μ̂_pruned − μ̂_dense), running_var ← dense running_var ·
  (σ̂²_pruned + ε) / (σ̂²_dense + ε). With nothing removed it changes nothing, whatever the images;
  re-estimating the absolute statistics on a small or narrow calibration set (a few hundred crops
  of three photos) replaces ImageNet statistics by those of the photos and alone cut a dense
  efficientnet-lite0 to 34 % top-1 agreement with itself (`reestimate_batchnorm` keeps that
  absolute re-estimation for callers that want it).

A layer without a bias folds its bias fit into the BatchNorm that reads its output (found by one
traced forward pass: timm EfficientNet's conv_pwl → bn3, a depthwise-separable conv_pw → bn2,
ResNet's convN → bnN). All statistics come from one paired pass of the dense and the pruned
network (the pruned inputs are those of the uncompensated network), then the BatchNorm correction,
if asked, runs last.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.prune.nm_solve import solve_masked

log = logging.getLogger(__name__)

PARTS = ("bias", "lsq", "bn")
COMPENSATIONS = ("none", "bias", "lsq", "bn", "bias+bn", "lsq+bn")
DEFAULT_COMPENSATION = "lsq+bn"
NM_SOLVERS = ("auto", "cg", "exact")
INPUTS = ("dense", "pruned", "sequential")
# `auto` solves N:M rows exactly up to this many unknowns per row, by CG above: per row, Cholesky
# costs ~u³/3 float64 flops and 50 CG steps ~400·u² float32 ones (scripts/nm_lsq_bench.py: at
# u = 385, a ViT-B/16 attn.proj, CG took 7.0 CPU-s against 13.3 for the exact solve)
EXACT_NM_UNKNOWNS = 256
MAX_LSQ_FEATURES = 4608  # im2col width above which an N:M conv gets `bias` instead of `lsq`


@dataclasses.dataclass(frozen=True)
class CompensateConfig:
    method: str = DEFAULT_COMPENSATION
    ridge: float = 1e-3  # λ relative to the mean diagonal of X̂ᵀX̂
    max_rows: int = 65536  # calibration rows (tokens / positions) per layer, spread over batches
    batch_size: int = 32
    seed: int = 0
    # where the input rows x̂ come from: "dense" = the dense network's input to the layer, kept
    # columns only (each layer corrects its own cut); "pruned" = the uncompensated pruned
    # network's (each layer also corrects upstream cuts, which their own fits correct again);
    # "sequential" = layers fitted one at a time in forward order, each on the input rows of the
    # pruned network whose upstream layers are already re-fitted (one partial paired pass each)
    inputs: str = "dense"
    # how an N:M layer's rows are solved on their supports: "cg" = all rows at once by batched
    # conjugate gradients on the shared Gram (prune/nm_solve.py), "exact" = a Cholesky per row,
    # "auto" = exact up to EXACT_NM_UNKNOWNS unknowns per row, cg above
    nm_solver: str = "auto"

    def __post_init__(self):
        parse_compensation(self.method)
        if self.nm_solver not in NM_SOLVERS:
            raise UserError(
                f"nm_solver must be one of {', '.join(NM_SOLVERS)} (got {self.nm_solver})"
            )
        check_compensate_inputs(self.inputs)
        if self.ridge < 0:
            raise UserError(f"compensation ridge must be ≥ 0 (got {self.ridge})")

    @property
    def parts(self) -> tuple[str, ...]:
        return parse_compensation(self.method)


def check_compensate_inputs(inputs: str) -> None:
    """`--compensate-inputs` / `CompensateConfig.inputs`: one of INPUTS, else one clear line."""
    if inputs not in INPUTS:
        raise UserError(
            f"unknown --compensate-inputs '{inputs}': choose one of {', '.join(INPUTS)}"
        )


def parse_compensation(name: str) -> tuple[str, ...]:
    """'lsq+bn' → ('lsq', 'bn'); 'none' → (); a UserError for anything else."""
    if name not in COMPENSATIONS:
        raise UserError(f"unknown --compensate '{name}': choose one of {', '.join(COMPENSATIONS)}")
    return () if name == "none" else tuple(name.split("+"))


@dataclasses.dataclass(frozen=True)
class LayerFit:
    """One layer to re-fit: its name (same in both models) and where its pruned weights sit.

    `out_rows`: dense output channels the pruned layer still has (None: all of them).
    `support`: bool (out, features) of the weight slots allowed to be non-zero (an N:M mask,
    flattened like weight.reshape(out, -1)); None: every slot of the pruned weight.
    `in_features`: the dense layer's flattened input columns the pruned layer still reads (for
    `inputs="dense"`); None: all of them.
    `prior` (N:M layers only): ρ ∈ [0, 1) of the `lsq` fit on the moment (1 − ρ)·C + ρ·μ·I (C the
    input covariance, μ its mean variance) that `obs_shrink` chose the mask on, i.e. a ridge
    pulling the kept weights towards the dense layer's (`towards_dense`); 0: the plain fit.
    """

    name: str
    out_rows: torch.Tensor | None = None
    support: torch.Tensor | None = None
    in_features: torch.Tensor | None = None  # kept columns of the dense flattened weight
    prior: float = 0.0


def compensate(
    dense: nn.Module,
    pruned: nn.Module,
    calib: torch.Tensor,
    layers: list[LayerFit],
    config: CompensateConfig,
    *,
    known: Mapping[str, _LayerStats] | None = None,
) -> dict[str, Any]:
    """Apply `config.parts` to `pruned` in place; return the record (what was done where).

    `known`: statistics of some layers already at hand (`GramStatistics`, with `inputs="dense"`
    only); the calibration pass then collects the others alone, or is skipped."""
    parts = config.parts
    start = time.perf_counter()
    record: dict[str, Any] = {
        "method": config.method,
        "inputs": config.inputs,
        "layers": {},
        "calibration_images": 0,
    }
    if not parts:
        return record
    if calib is None or calib.shape[0] < 2:
        have = 0 if calib is None else int(calib.shape[0])
        raise UserError(
            f"--compensate {config.method} needs at least 2 calibration images (got {have})"
        )
    record["calibration_images"] = int(calib.shape[0])
    fit_part = "lsq" if "lsq" in parts else "bias" if "bias" in parts else None
    known = known if known is not None and config.inputs == "dense" else {}
    if fit_part and layers:
        norms = following_norms(pruned, [layer.name for layer in layers], calib[:1])
        if config.inputs == "sequential":
            layers = forward_order(pruned, layers, calib[:1])
            stats = _LazyStats(dense, pruned, calib, layers, config, need_gram=fit_part == "lsq")
        else:
            missing = [layer for layer in layers if layer.name not in known]
            stats = {}
            if missing:
                stats = collect_statistics(
                    dense, pruned, calib, missing, config, need_gram=fit_part == "lsq"
                )
        ill_posed = {}
        for layer in layers:
            if layer.name in known and layer.name not in stats:
                stats[layer.name] = known[layer.name]
            need = _images_needed(stats[layer.name], layer, calib.shape[0])
            if fit_part == "lsq" and need:
                ill_posed[layer.name] = need
            part = "bias" if layer.name in ill_posed else fit_part
            layer_stats = stats[layer.name]
            if part == "lsq" and layer.prior > 0:
                dense_weight = dense.get_submodule(layer.name).weight
                layer_stats = towards_dense(layer_stats, dense_weight, layer.prior)
            entry = refit_layer(
                pruned,
                layer,
                layer_stats,
                part,
                config.ridge,
                norm=norms.get(layer.name),
                solver=config.nm_solver,
            )
            if layer.name in ill_posed:
                entry["lsq_needs_images"] = ill_posed[layer.name]
            if layer.name in known:
                entry["statistics"] = "from the input Gram at hand, no pass"
            if part == "lsq" and layer.prior > 0:
                entry["prior"] = layer.prior
            record["layers"][layer.name] = entry
            if isinstance(stats, dict):  # a layer's sums are read once: free them
                stats.pop(layer.name, None)
        if ill_posed:
            _warn_ill_posed(ill_posed, calib.shape[0])
            record["lsq_fell_back_to_bias"] = sorted(ill_posed)
    if "bn" in parts:
        channels = getattr(layers, "norm_channels", None)
        record["batchnorm"] = shift_batchnorm(dense, pruned, calib, config.batch_size, channels)
        record["batchnorm_layers"] = record["batchnorm"]["corrected"]
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


# --- statistics ---------------------------------------------------------------------------------


class _LayerStats:
    """Σ x̃ x̃ᵀ (or Σ x̃ only) and Σ x̃ yᵀ over calibration rows, x̃ = [x̂, 1], summed in float64.

    Each batch's products are taken in the activations' own precision (float32: half the time of
    float64 products) on rows shifted by the first batch's means, c and d, and added to the
    float64 sums with the shift undone exactly in float64 (Σ x yᵀ = Σ (x−c)(y−d)ᵀ + c Σyᵀ +
    Σx dᵀ − n c dᵀ): the float32 round-off then scales with the spread of the rows, not with
    their mean, which the bias column takes out of the solution again.
    """

    def __init__(self, features: int, outputs: int, need_gram: bool):
        self.need_gram = need_gram
        size = features + 1
        self.gram = torch.zeros(size, size, dtype=torch.float64) if need_gram else None
        self.sum_x = torch.zeros(size, dtype=torch.float64)
        self.cross = torch.zeros(size, outputs, dtype=torch.float64) if need_gram else None
        self.sum_y = torch.zeros(outputs, dtype=torch.float64)
        self.rows = 0
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None  # c, d (see above)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rows, features = x.shape
        if rows == 0:  # a batch whose rows the quota skipped
            return
        sum_x = x.sum(0, dtype=torch.float64)
        self.sum_x[:features] += sum_x
        self.sum_x[features] += rows
        sum_y = y.sum(0, dtype=torch.float64)
        self.sum_y += sum_y
        if self.need_gram:
            if self.shift is None:
                self.shift = ((sum_x / rows).to(x.dtype), (sum_y / rows).to(x.dtype))
            c, d = self.shift
            x_c, y_d = x - c, y.to(x.dtype) - d
            c, d = c.double(), d.double()
            c_sum = torch.outer(c, sum_x)
            gram = (x_c.T @ x_c).double() + c_sum + c_sum.T - rows * torch.outer(c, c)
            cross = (x_c.T @ y_d).double() + torch.outer(c, sum_y)
            cross += torch.outer(sum_x, d) - rows * torch.outer(c, d)
            self.gram[:features, :features] += gram
            self.gram[:features, features] += sum_x
            self.gram[features, :features] += sum_x
            self.gram[features, features] += rows
            self.cross[:features] += cross
            self.cross[features] += sum_y
        self.rows += rows


def stats_from_gram(
    gram: torch.Tensor, sum_x: torch.Tensor, rows: int, weight: torch.Tensor, bias
) -> _LayerStats:
    """What `collect_statistics` sums for a layer with `inputs="dense"`, from the Gram Σ x xᵀ, Σ x
    and the count of those same input rows (an OBS capture's, prune/obs.py) and the dense layer
    itself: its output on a row is y = W x + b, so Σ x̃ yᵀ = (Σ x̃ x̃ᵀ) [W b]ᵀ with x̃ = [x, 1].
    The columns must be in the order of weight.reshape(out, -1) (a Linear's, a 1×1 conv's)."""
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    features = flat.shape[1]
    if gram.shape != (features, features):
        raise ValueError(f"a Gram of {tuple(gram.shape)} for a weight of {features} columns")
    s = _LayerStats(features, flat.shape[0], need_gram=True)
    s.gram[:features, :features] = gram
    s.gram[:features, features] = s.gram[features, :features] = sum_x
    s.gram[features, features] = rows
    b = torch.zeros(flat.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    s.cross = s.gram @ torch.cat([flat.T, b[None]])
    s.sum_x = s.gram[features].clone()
    s.sum_y = s.cross[features].clone()
    s.rows = int(rows)
    return s


MAX_PRIOR = 0.99  # ρ = 1 would be an infinite pull: the dense weights on the support, unfitted


def towards_dense(s: _LayerStats, weight: torch.Tensor, rho: float) -> _LayerStats:
    """`s` with a ridge λ‖β_w − w_dense‖² added, λ = n·μ·ρ / (1 − ρ) (μ: the mean input variance,
    n: the rows): the least squares of `s` then minimises the output error on the shrunk moment
    (1 − ρ)·C + ρ·μ·I rather than on C (`LayerFit.prior`). ρ is clipped to MAX_PRIOR. The bias
    column is not pulled. A new object; `s` is unchanged."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"a prior of ρ = {rho} is outside [0, 1]")
    rho = min(rho, MAX_PRIOR)
    features = s.gram.shape[0] - 1
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    if flat.shape[1] != features:
        raise ValueError(f"a weight of {flat.shape[1]} columns for statistics of {features}")
    mean = s.sum_x[:features] / s.rows
    mu = float((s.gram.diagonal()[:features] / s.rows - mean**2).mean())
    lam = s.rows * mu * rho / (1.0 - rho)
    pulled = copy.copy(s)
    pulled.gram = s.gram.clone()
    pulled.gram.diagonal()[:features] += lam
    pulled.cross = s.cross.clone()
    pulled.cross[:features] += lam * flat.T
    return pulled


class GramStatistics(Mapping):
    """Layer name → `stats_from_gram` of the dense model's layer, built when first read (one
    layer's sums alive at a time). `grams`: name → (Σ x xᵀ, Σ x, rows)."""

    def __init__(
        self, dense: nn.Module, grams: Mapping[str, tuple[torch.Tensor, torch.Tensor, int]]
    ):
        self.dense, self.grams = dense, dict(grams)

    def __getitem__(self, name: str) -> _LayerStats:
        gram, sum_x, rows = self.grams[name]
        module = self.dense.get_submodule(name)
        return stats_from_gram(gram, sum_x, rows, module.weight, module.bias)

    def __contains__(self, name: object) -> bool:  # Mapping's default would build the sums
        return name in self.grams

    def __iter__(self):
        return iter(self.grams)

    def __len__(self) -> int:
        return len(self.grams)


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies its flattened weight with: tokens, or im2col patches."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.padding_mode != "zeros":
        raise UserError(f"compensation supports zero-padded convs only ({module})")
    padding = module.padding
    if isinstance(padding, str):  # "same"/"valid": pad explicitly, then unfold without padding
        x = F.pad(x, module._reversed_padding_repeated_twice)
        padding = 0
    patches = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )  # (B, C·kh·kw, L): the order of weight.reshape(out, -1)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def collect_statistics(
    dense: nn.Module,
    pruned: nn.Module,
    calib: torch.Tensor,
    layers: list[LayerFit],
    config: CompensateConfig,
    *,
    need_gram: bool,
    stop: bool = False,
) -> dict[str, _LayerStats]:
    """The dense layers' outputs (targets) and the input rows x̂, summed over the calibration set.

    inputs="dense": one pass of the dense network; otherwise paired passes, batch by batch.
    `stop`: end both passes of a batch as soon as the (single) layer has its rows.
    """
    from mpdeploy.prune.cast import _RowQuota

    stats, quotas, targets, handles = {}, {}, {}, []
    current = [0]
    paired = config.inputs != "dense"
    if stop and len(layers) != 1:
        raise ValueError("stop=True collects one layer at a time")

    def add(layer: LayerFit, x: torch.Tensor, y: torch.Tensor) -> None:
        chosen = quotas[layer.name].choose(x.shape[0], current[0])
        stats[layer.name].add(x[chosen], y[chosen])

    for layer in layers:
        module = pruned.get_submodule(layer.name)
        _check_layer(module, layer.name)
        features = module.weight[0].numel()
        stats[layer.name] = _LayerStats(features, module.weight.shape[0], need_gram)
        quotas[layer.name] = _RowQuota(calib.shape[0], config.max_rows, config.seed)

        def dense_hook(mod, inputs, output, layer=layer):
            y = output_rows(mod, output.detach())
            y = y if layer.out_rows is None else y[:, layer.out_rows]
            if paired:
                targets[layer.name] = y
                if stop:
                    raise _Stop
                return
            x = layer_rows(mod, inputs[0].detach())
            add(layer, x if layer.in_features is None else x[:, layer.in_features], y)

        def pruned_hook(mod, inputs, layer=layer):
            add(layer, layer_rows(mod, inputs[0].detach()), targets.pop(layer.name))
            if stop:
                raise _Stop

        handles.append(dense.get_submodule(layer.name).register_forward_hook(dense_hook))
        if paired:
            handles.append(module.register_forward_pre_hook(pruned_hook))
    try:
        with torch.no_grad():
            for batch in calib.split(config.batch_size):
                current[0] = batch.shape[0]
                _run(dense, batch)
                if paired:
                    _run(pruned, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being fitted has its rows."""


def _run(model: nn.Module, batch: torch.Tensor) -> None:
    with contextlib.suppress(_Stop):
        model(batch)


class _LazyStats:
    """`inputs="sequential"`: a layer's statistics are collected when first asked for, after
    every layer before it in forward order has been re-fitted (one partial paired pass each)."""

    def __init__(self, dense, pruned, calib, layers, config: CompensateConfig, *, need_gram: bool):
        self.args = (dense, pruned, calib)
        self.config, self.need_gram = config, need_gram
        self.layers: dict[str, LayerFit] = {layer.name: layer for layer in layers}
        self.last: tuple[str, _LayerStats] | None = None

    def __getitem__(self, name: str) -> _LayerStats:
        if self.last is None or self.last[0] != name:
            layer = self.layers[name]
            got = collect_statistics(
                *self.args, [layer], self.config, need_gram=self.need_gram, stop=True
            )
            self.last = (name, got[name])
        return self.last[1]


def forward_order(model: nn.Module, layers: list[LayerFit], sample: torch.Tensor) -> list[LayerFit]:
    """`layers` sorted by when each first runs in a forward pass on `sample` (those that never
    run keep their place at the end)."""
    seen: dict[str, int] = {}
    handles = []
    for layer in layers:

        def hook(mod, inputs, name=layer.name):
            seen.setdefault(name, len(seen))

        handles.append(model.get_submodule(layer.name).register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return sorted(layers, key=lambda layer: seen.get(layer.name, len(layers)))


def _check_layer(module: nn.Module, name: str) -> None:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise UserError(f"compensation supports Linear and Conv2d layers ({name} is {module})")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise UserError(f"compensation does not support grouped convs ({name})")


def _images_needed(s: _LayerStats, layer: LayerFit, images: int) -> int:
    """0 when the layer has at least as many calibration rows as unknowns per output row, else
    the number of images it would need. Such layers get the `bias` fit instead of `lsq` (one
    warning names the worst): least squares on fewer rows than unknowns reproduces the
    calibration rows exactly and little else."""
    unknowns = _max_unknowns(layer, s) if s.need_gram else 0
    if s.rows >= unknowns:
        return 0
    per_image = max(s.rows // max(images, 1), 1)
    return -(-unknowns // per_image)


def _warn_ill_posed(needs: Mapping[str, int], images: int) -> None:
    log.warning(
        "--compensate lsq: %d layer(s) have fewer calibration rows than unknowns (%s needs "
        "%d images, got %d); they get the bias fit instead",
        len(needs),
        max(needs, key=needs.get),
        max(needs.values()),
        images,
    )


def _max_unknowns(layer: LayerFit, s: _LayerStats) -> int:
    if layer.support is None:
        return s.gram.shape[0]
    return int(layer.support.sum(1).max()) + 1


# --- the fits -----------------------------------------------------------------------------------


def refit_layer(
    pruned: nn.Module,
    layer: LayerFit,
    s: _LayerStats,
    part: str,
    ridge: float,
    *,
    norm: str | None = None,
    solver: str = "auto",
) -> dict[str, Any]:
    module = pruned.get_submodule(layer.name)
    weight = module.weight.detach()
    flat = weight.reshape(weight.shape[0], -1).double()
    bias_sink = bias_target(pruned, layer.name, norm)
    if part == "lsq" and flat.shape[1] > MAX_LSQ_FEATURES and layer.support is not None:
        part = "bias"
    entry: dict[str, Any] = {"fit": part, "rows": s.rows, "bias_into": bias_sink}
    bias = _current_bias(pruned, layer.name, bias_sink, weight.shape[0])
    if part == "lsq":
        new_flat, new_bias = solve_lsq(
            s, layer.support, ridge, fit_bias=bias_sink is not None, solver=solver, start=flat
        )
        if layer.support is not None:
            entry["solver"] = nm_solver(layer.support, solver)
        if bias_sink is None:
            new_bias = bias
        entry["weight_change"] = float((new_flat - flat).norm() / flat.norm().clamp_min(1e-30))
    else:
        mean_x = s.sum_x[:-1] / s.rows
        predicted = flat @ mean_x + bias
        new_flat, new_bias = flat, bias + (s.sum_y / s.rows - predicted)
        if bias_sink is None:
            entry["fit"] = "none (no bias and no BatchNorm after it to hold one)"
            return entry
    entry["bias_shift"] = float((new_bias - bias).abs().max())
    with torch.no_grad():
        module.weight.copy_(new_flat.reshape(weight.shape).to(weight.dtype))
        if bias_sink is not None:
            _write_bias(pruned, layer.name, bias_sink, new_bias)
    return entry


def solve_lsq(
    s: _LayerStats,
    support: torch.Tensor | None,
    ridge: float,
    *,
    fit_bias: bool = True,
    solver: str = "auto",
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """β = (X̃ᵀX̃ + λD)⁻¹ X̃ᵀY on each row's support; λ on the weights only, not the bias.

    With a support, the `cg` solver solves all rows at once by conjugate gradients warm-started at
    `start` (`nm_solve.solve_masked`); `exact` factorises each row's sub-Gram (`nm_solver`)."""
    gram, cross = s.gram, s.cross
    if support is not None and nm_solver(support, solver) == "cg":
        fast = solve_masked(gram, cross, support, ridge, fit_bias=fit_bias, start=start)
        return fast.weight, fast.bias
    features = gram.shape[0] - 1
    if not fit_bias:  # no place for a bias: solve on the weight columns only
        gram, cross = gram[:-1, :-1], cross[:-1]
    diag = gram.diagonal()[:features]
    lam = ridge * float(diag.mean()) if features else 0.0
    reg = torch.zeros(gram.shape[0], dtype=torch.float64)
    reg[:features] = lam
    outputs = cross.shape[1]
    weight = torch.zeros(outputs, features, dtype=torch.float64)
    bias = torch.zeros(outputs, dtype=torch.float64)
    if support is None:
        beta = _solve(gram + torch.diag(reg), cross)  # (features[+1], out)
        weight[:] = beta[:features].T
        if fit_bias:
            bias[:] = beta[features]
        return weight, bias
    support = support.reshape(outputs, features).bool()
    counts = support.sum(1)
    for count in torch.unique(counts).tolist():
        rows = (counts == count).nonzero().squeeze(1)
        for chunk in rows.split(max(1, int(2e7) // (count + 1) ** 2)):  # ≤ ~160 MB of sub-Grams
            idx = support[chunk].nonzero()[:, 1].view(len(chunk), count)
            if fit_bias:
                idx = torch.cat([idx, torch.full((len(chunk), 1), features)], 1)
            sub = gram[idx.unsqueeze(2), idx.unsqueeze(1)]  # a new tensor: safe to add into
            sub.diagonal(dim1=1, dim2=2).add_(reg[idx])
            rhs = cross[idx, chunk.unsqueeze(1)].unsqueeze(2)
            beta = _solve(sub, rhs).squeeze(2)
            weight[chunk.unsqueeze(1), idx[:, :count]] = beta[:, :count]
            if fit_bias:
                bias[chunk] = beta[:, count]
    return weight, bias


def nm_solver(support: torch.Tensor, solver: str) -> str:
    """'cg' or 'exact' for a layer with this support; `auto` is exact where it is cheap."""
    if solver != "auto":
        return solver
    support = support.reshape(support.shape[0], -1)
    unknowns = int(support.sum(1).max()) + 1 if support.numel() else 1
    return "exact" if unknowns <= EXACT_NM_UNKNOWNS else "cg"


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cholesky solve of the SPD normal equations; a pseudo-inverse fallback if singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def bias_target(model: nn.Module, name: str, norm: str | None = None) -> str | None:
    """Where layer `name` can hold a bias: its own bias, or the BatchNorm right after it (whose
    running mean then absorbs the layer's new output bias; a layer without one has bias 0).

    `norm`: that BatchNorm's name where it is known (`following_norms`); otherwise it is guessed
    from timm ResNet names (convN → bnN)."""
    module = model.get_submodule(name)
    if module.bias is not None:
        return f"{name}.bias"
    if norm is not None:
        return f"{norm}.running_mean"
    parent, _, leaf = name.rpartition(".")
    if leaf.startswith("conv"):  # timm ResNet convN → bnN
        bn_name = f"{parent}.bn{leaf[4:]}" if parent else f"bn{leaf[4:]}"
        try:
            bn = model.get_submodule(bn_name)
        except AttributeError:
            return None
        if (
            isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.num_features == module.weight.shape[0]
        ):
            return f"{bn_name}.running_mean"
    return None


def following_norms(model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, str]:
    """For each layer in `names`, the BatchNorm whose input is exactly that layer's output (one
    forward pass on `sample`, tensors compared by identity; same channel count). Layers with no
    such BatchNorm are left out, as are all of them in a model without BatchNorm."""
    norms = {
        m: n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    if not norms or not names:
        return {}
    outputs: dict[str, torch.Tensor] = {}
    found: dict[str, str] = {}
    handles = []

    def remember(name):
        def hook(mod, inputs, output):
            outputs[name] = output

        return hook

    def match(mod, inputs):
        for name, output in outputs.items():
            if inputs[0] is output and mod.num_features == output.shape[1]:
                found.setdefault(name, norms[mod])

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(remember(name)))
        for norm in norms:
            handles.append(norm.register_forward_pre_hook(match))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(sample)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _current_bias(model: nn.Module, name: str, sink: str | None, outputs: int) -> torch.Tensor:
    """The layer's own output bias (zero when it has none: a following BatchNorm's shift is not
    part of the layer's output)."""
    if sink is None or not sink.endswith(".bias"):
        return torch.zeros(outputs, dtype=torch.float64)
    return model.get_parameter(sink).detach().double()


def _write_bias(model: nn.Module, name: str, sink: str, bias: torch.Tensor) -> None:
    if sink.endswith(".bias"):
        target = model.get_parameter(sink)
        target.copy_(bias.to(target.dtype))
    else:  # BN computes (x − running_mean): a bias δ on x is running_mean − δ
        target = model.get_buffer(sink)
        target.sub_(bias.to(target.dtype))


# --- BatchNorm ------------------------------------------------------------------------------------


def reestimate_batchnorm(model: nn.Module, calib: torch.Tensor, batch_size: int) -> int:
    """Recompute every BatchNorm's running statistics on `calib` (the pass runs BatchNorms in
    training mode, as timm/SWA's bn_update does): the running mean ends as the exact calibration
    mean, the running variance as the batch-size-weighted mean of the per-batch variances."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.train()
        seen = 0
        with torch.no_grad():
            for batch in calib.split(batch_size):
                for m in norms:  # running ← running + b/(seen+b)·(batch − running): a weighted mean
                    m.momentum = batch.shape[0] / (seen + batch.shape[0])
                model(batch)
                seen += batch.shape[0]
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return len(norms)


def shift_batchnorm(
    dense: nn.Module,
    pruned: nn.Module,
    calib: torch.Tensor,
    batch_size: int,
    channels: Mapping[str, torch.Tensor] | None = None,
    *,
    variance: bool = True,
) -> dict[str, Any]:
    """Correct every BatchNorm of `pruned` by the shift pruning causes at its input, measured
    against `dense` on the same calibration images: running_mean = dense mean + (μ̂_p − μ̂_d),
    running_var = dense var · (σ̂²_p + ε)/(σ̂²_d + ε) (`variance=False`: the mean only).

    The base statistics are the dense BatchNorm's (a bias folded into a running mean before is
    superseded: the correction measures the whole shift at the norm's input). Batches run in
    order through both networks; while a batch passes, each pruned BatchNorm already normalises
    with that batch's correction, so later norms see corrected inputs (as BatchNorm
    re-estimation in training mode does). `channels`: the dense channels a narrower pruned
    BatchNorm kept (structured pruning); a narrower one without them is left alone."""
    dense_modules = dict(dense.named_modules())
    todo, skipped = {}, []
    for name, norm in pruned.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        ref = dense_modules.get(name)
        if not isinstance(ref, nn.modules.batchnorm._BatchNorm) or ref.running_mean is None:
            skipped.append(name)
            continue
        if channels is not None and name in channels:
            idx = torch.as_tensor(channels[name], dtype=torch.long)
        elif ref.num_features == norm.num_features:
            idx = torch.arange(norm.num_features)
        else:
            skipped.append(name)
            continue
        if idx.numel() != norm.num_features:
            skipped.append(name)
            continue
        todo[name] = (norm, ref, idx)
    if not todo:
        return {"corrected": 0, "skipped": skipped, "variance": variance}
    base = {
        n: (ref.running_mean[idx].double(), ref.running_var[idx].double())
        for n, (_, ref, idx) in todo.items()
    }
    sums = {n: torch.zeros(4, len(idx), dtype=torch.float64) for n, (_, _, idx) in todo.items()}
    count = dict.fromkeys(todo, 0)
    batch_dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        return x.sum(1), (x * x).sum(1), x.shape[1]

    def dense_hook(name):
        def hook(mod, inputs):
            s1, s2, n = moments(inputs[0])
            idx = todo[name][2]
            batch_dense[name] = (s1[idx], s2[idx])
            sums[name][0] += s1[idx]
            sums[name][1] += s2[idx]

        return hook

    def pruned_hook(name):
        def hook(mod, inputs):
            s1, s2, n = moments(inputs[0])
            d1, d2 = batch_dense.pop(name)
            sums[name][2] += s1
            sums[name][3] += s2
            count[name] += n
            _set_shifted(mod, base[name], (d1 / n, d2 / n), (s1 / n, s2 / n), variance)

        return hook

    handles = []
    was_training = (dense.training, pruned.training)
    try:
        for name, (norm, ref, _) in todo.items():
            handles.append(ref.register_forward_pre_hook(dense_hook(name)))
            handles.append(norm.register_forward_pre_hook(pruned_hook(name)))
        dense.eval()
        pruned.eval()
        with torch.no_grad():
            for batch in calib.split(batch_size):
                dense(batch)
                pruned(batch)
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training[0])
        pruned.train(was_training[1])
    shifts = []
    for name, (norm, _, _) in todo.items():
        n = max(count[name], 1)
        s = sums[name] / n
        _set_shifted(norm, base[name], (s[0], s[1]), (s[2], s[3]), variance)
        scale = base[name][1].sqrt().clamp_min(1e-12)
        shifts.append(float(((norm.running_mean.double() - base[name][0]) / scale).abs().max()))
    return {
        "corrected": len(todo),
        "skipped": skipped,
        "variance": variance,
        "max_mean_shift_in_sd": round(max(shifts), 4),
    }


def _set_shifted(norm, base, dense_moments, pruned_moments, variance: bool) -> None:
    mean0, var0 = base
    d_mean, p_mean = dense_moments[0], pruned_moments[0]
    with torch.no_grad():
        norm.running_mean.copy_((mean0 + p_mean - d_mean).to(norm.running_mean.dtype))
        if variance:
            d_var = (dense_moments[1] - d_mean**2).clamp_min(0)
            p_var = (pruned_moments[1] - p_mean**2).clamp_min(0)
            ratio = (p_var + norm.eps) / (d_var + norm.eps)
            norm.running_var.copy_((var0 * ratio).to(norm.running_var.dtype))
        else:
            norm.running_var.copy_(var0.to(norm.running_var.dtype))


# --- which layers to re-fit -----------------------------------------------------------------------


def structured_layers(
    model: nn.Module, groups: list[Any], removed: Mapping[str, set[int]]
) -> list[LayerFit]:
    """The consumer layers of the groups that lost units, with their kept dense output rows."""
    from mpdeploy.families.surgery import keep_indices

    keep = keep_indices(groups, removed)
    # a consumer that also produces a cut group (ResNet bottleneck conv2) keeps fewer rows
    out_rows = {}
    for group in groups:
        if group.name not in keep:
            continue
        for piece in group.producers:
            module, _, attr = piece.name.rpartition(".")
            if attr == "weight" and piece.dim == 0 and piece.offset == 0:
                out_rows[module] = torch.as_tensor(keep[group.name])
    fits = []
    for group in groups:
        if removed.get(group.name):
            name = group.consumer_module
            kept = torch.as_tensor(keep[group.name])
            taps = model.get_submodule(name).weight[0, 0].numel()  # kh·kw (1 for a Linear)
            columns = (kept.unsqueeze(1) * taps + torch.arange(taps)).flatten()
            fits.append(LayerFit(name, out_rows=out_rows.get(name), in_features=columns))
    return StructuredFits(fits, norm_channels=_norm_channels(groups, keep))


class StructuredFits(list):
    """The LayerFits of a structured cut, plus `norm_channels`: for each BatchNorm the cut made
    narrower, the dense channels it kept (what `shift_batchnorm` compares it with)."""

    def __init__(self, fits, norm_channels: Mapping[str, torch.Tensor]):
        super().__init__(fits)
        self.norm_channels = dict(norm_channels)


def _norm_channels(groups: list[Any], keep: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    channels = {}
    for group in groups:
        if group.name not in keep:
            continue
        kept = torch.as_tensor(keep[group.name], dtype=torch.long)
        for piece in group.producers:
            module, _, attr = piece.name.rpartition(".")
            if attr == "running_mean" and piece.dim == 0:
                channels[module] = kept + piece.offset
    return channels


def masked_layers(masks: Mapping[str, torch.Tensor]) -> list[LayerFit]:
    """N:M: every masked weight's layer, each output row solved on its kept slots."""
    fits = []
    for name, mask in masks.items():
        module, _, attr = name.rpartition(".")
        if attr == "weight":
            fits.append(LayerFit(module, support=mask.reshape(mask.shape[0], -1).bool()))
    return fits
