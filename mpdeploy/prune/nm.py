"""N:M structured sparsity TensorRT can use: CAST masks, folded permutations, sparse-MAC accounting.

`sparsify(model, calib_images, SparsityConfig(k, n), input_shape=...)` returns a model whose
eligible Linear/Conv2d weights keep k of every n along TensorRT's reduction axis (`layout.py`),
chosen by the calibration-weighted CAST projection (`cast.py`) after channel permutations folded
into neighbouring layers (`permute.py`). `SparsifyResult.save` writes `sparsity.json` and
`pruned/masks.safetensors`; `confirm_with_polygraphy` re-checks the exported ONNX independently.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.fileio import atomic_path, read_json, write_json
from mpdeploy.prune import cast, permute
from mpdeploy.prune.layout import LayerLayout, conforms, keep_dense, layer_layouts

log = logging.getLogger(__name__)

METHODS = ("cast", "cast_fisher", "magnitude", "obs", "obs_fisher", "obs_shrink")
OBS_METHODS = ("obs", "obs_fisher", "obs_shrink")  # prune/obs.py
SEQUENTIAL = ("off", "block", "layer")
SPARSITY_JSON = "sparsity.json"
MASKS_FILE = Path("pruned") / "masks.safetensors"
NATIVE_PATTERN = (2, 4)  # the only pattern with a TensorRT sparse kernel (and Polygraphy check)
NOT_CHECKABLE = "not checkable (only 2:4 has a TensorRT kernel)"
POLYGRAPHY_TIMEOUT_S = 1800
MIN_BUDGET_IMAGES = 64  # the calibration passes read at least this many images (if given)
_FOUND = re.compile(r"Found (sparse|non-sparse) tensor: (\S+)")


def check_method(method: str) -> None:
    """A UserError (one line) unless `method` is an N:M method this module knows."""
    if method not in METHODS:
        raise UserError(f"unknown --sparsity-method '{method}': choose one of {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    k: int
    n: int
    # "obs" | "obs_fisher" | "obs_shrink" (prune/obs.py) | "cast" (the paper's CAST) | "cast_fisher"
    # | "magnitude";
    # obs_shrink is the default since 2026-11-28 (obs before): at least tied with obs on every
    # suite cell and a lower held-out KL on efficientnet-lite0 calibrated on a few photos
    # (docs/sparsity.md, "Choosing the default 2:4 method" and "obs_shrink")
    method: str = "obs_shrink"
    permute: bool = True
    include_classifier: bool = False
    max_rows: int = 4096  # calibration rows per layer for C_g (tokens or im2col patches)
    seed: int = 0
    # images for the channel energies E[h²] that rank channels: None = every image the stage
    # reads (deterministic on distinct images; the default since 2026-11-29, 32 seeded before:
    # docs/sparsity.md, "The energies from every calibration image"); an int caps it at a
    # seeded subset of that many
    permute_images: int | None = None
    batch_size: int = 32
    # CAST only: capture C_g step by step on the network whose earlier steps are already sparse
    # ("block": one step per residual block, "layer": one per layer) instead of in one dense pass
    sequential: str = "off"  # "off" | "block" | "layer"
    # closed-form re-fit of the kept weights after projection (prune/compensate.py): each output
    # row's kept slots by least squares against the dense layer (`lsq`), BatchNorm re-estimated
    compensate: str = "lsq+bn"
    # where the `lsq` re-fit reads each layer's inputs (CompensateConfig.inputs): "dense" (the
    # dense network's, one pass) or "sequential" (the network whose earlier layers are already
    # sparse and re-fitted: it also corrects what they left; one partial pass per layer) or
    # "pruned" (the sparse network's before any re-fit). Sequential lost on efficientnet-lite0's
    # held-out photos (docs/sparsity.md, "The re-fit on sequential inputs")
    compensate_inputs: str = "dense"
    # work budget of the calibration passes in dense MACs, as `PruneConfig.compensate_macs`:
    # the stage reads the first ⌊calib_macs / MACs per image⌋ images (at least 64); None = all.
    # ViT-B/16: 68 of 256; the suite's digits models: every image.
    calib_macs: float | None = 1.2e12
    # module-name patterns (shell-style) of layers to leave dense, e.g. ("blocks.0.*",); each
    # must match a Linear/Conv2d of the model (layout.keep_dense)
    dense_layers: tuple[str, ...] = ()

    def __post_init__(self):
        from mpdeploy.prune.compensate import check_compensate_inputs, parse_compensation

        if self.calib_macs is not None and not self.calib_macs >= 0:
            raise UserError(f"calib_macs must be ≥ 0 or None (got {self.calib_macs})")

        parse_compensation(self.compensate)
        check_compensate_inputs(self.compensate_inputs)
        if not 0 < self.k < self.n <= 16:
            raise UserError(f"sparsity {self.k}:{self.n}: need 0 < k < n ≤ 16")
        check_method(self.method)
        if self.max_rows < 1:
            raise UserError(f"max_rows must be at least 1 (got {self.max_rows})")
        if self.permute_images is not None and self.permute_images < 1:
            raise UserError(
                f"permute_images must be at least 1 or None (got {self.permute_images})"
            )
        if isinstance(self.dense_layers, str) or not all(
            isinstance(p, str) and p for p in self.dense_layers
        ):
            raise UserError(f"dense_layers must be a tuple of patterns (got {self.dense_layers!r})")
        if self.sequential not in SEQUENTIAL:
            raise UserError(
                f"unknown sequential mode '{self.sequential}': use {', '.join(SEQUENTIAL)}"
            )

    @property
    def pattern(self) -> str:
        return f"{self.k}:{self.n}"


@dataclasses.dataclass
class SparsifyResult:
    model: nn.Module
    report: dict[str, Any]  # the content of sparsity.json
    headline: dict[str, Any]
    masks: dict[str, torch.Tensor]  # state_dict weight name → bool keep-mask

    def save(self, build_dir: str | os.PathLike) -> list[Path]:
        """Write `sparsity.json` and `pruned/masks.safetensors` into `build_dir`, atomically."""
        build_dir = Path(build_dir)
        return [
            save_masks(self.masks, build_dir),
            write_json(build_dir / SPARSITY_JSON, self.report),
        ]


# --- masks on disk and in the model -----------------------------------------------------------


def save_masks(masks: dict[str, torch.Tensor], build_dir: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(build_dir) / MASKS_FILE
    with atomic_path(path) as tmp:
        save_file({k: v.to(torch.bool).contiguous() for k, v in masks.items()}, str(tmp))
    return path


def load_masks(build_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The masks saved by `SparsifyResult.save`, or None when the build has no sparsity."""
    from safetensors.torch import load_file

    path = Path(build_dir) / MASKS_FILE
    return (
        {k: v.to(torch.bool) for k, v in load_file(str(path)).items()} if path.is_file() else None
    )


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero every weight entry whose mask is False (in place); call after each optimiser step."""
    with torch.no_grad():
        for name, mask in masks.items():
            try:
                param = model.get_parameter(name)
            except AttributeError:
                raise UserError(
                    f"mask for {name} does not match any parameter of the model"
                ) from None
            if tuple(param.shape) != tuple(mask.shape):
                raise UserError(
                    f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
                )
            param.masked_fill_(~mask.to(param.device, torch.bool), 0.0)
    return model


# --- the sparsify stage -------------------------------------------------------------------------


def sparsify(
    model: nn.Module,
    calib_images: torch.Tensor,
    config: SparsityConfig,
    *,
    input_shape: tuple[int, ...],
    reference_macs: int | None = None,
    groups: Sequence[Hashable] | None = None,
) -> SparsifyResult:
    """k:n-sparsify a copy of `model`; the report holds per-layer eligibility, sparsity and MACs.

    `reference_macs` (the dense model's, when `model` merges tokens) adds the combined reduction.
    `groups`: per calibration image, the photo it was cut from (`CalibrationSet.groups`), so that
    `obs_shrink` counts crops of one photo as one sample; None: the images are distinct.
    """
    if groups is not None and len(groups) != calib_images.shape[0]:
        raise ValueError(f"{len(groups)} calibration groups for {calib_images.shape[0]} images")
    model = copy.deepcopy(model).eval()
    images = calib_images.float()[
        : budget_images(model, calib_images.shape[0], config, input_shape)
    ]
    groups = None if groups is None else list(groups)[: images.shape[0]]
    timing: dict[str, float] = {}
    layouts = keep_dense(
        layer_layouts(
            model,
            config.n,
            include_classifier=config.include_classifier,
            image_channels=input_shape[0],
        ),
        config.dense_layers,
    )
    _require_eligible(model, layouts, config)
    eligible = {lay.name: lay.eligible for lay in layouts}

    start = time.perf_counter()
    permutations, permutation_images = (
        _permute(model, images, config, eligible) if config.permute else ([], 0)
    )
    timing["permutation_s"] = time.perf_counter() - start

    names = [lay.name for lay in layouts if lay.eligible]
    reference = copy.deepcopy(model) if config.compensate != "none" else None  # permuted, dense
    # magnitude ignores C_g (C = I), so it never pays for the sequential passes
    steps = _steps(names, config.sequential if config.method == "cast" else "off")
    moments: dict[str, cast.GroupMoments] = {}
    projections: dict[str, cast.Projection] = {}
    masks: dict[str, torch.Tensor] = {}
    timing["capture_s"] = timing["projection_s"] = 0.0
    dense_logits = None
    for step in steps:
        start = time.perf_counter()
        common = dict(max_rows=config.max_rows, seed=config.seed, batch_size=config.batch_size)
        if config.method in OBS_METHODS:
            captured, logits = _capture_obs(model, step, images, config, groups)
        elif config.method == "cast_fisher":
            captured, logits = cast.capture_fisher_moments(model, step, images, config.n, **common)
        else:
            captured, logits = cast.capture_group_moments(
                model,
                step,
                images,
                config.n,
                **common,
                seed_index={name: names.index(name) for name in step},
                stop_early=dense_logits is not None,
            )
        dense_logits = logits if dense_logits is None else dense_logits
        moments.update(captured)
        timing["capture_s"] += time.perf_counter() - start

        start = time.perf_counter()
        step_layouts = [lay for lay in layouts if lay.name in captured]
        projections.update(_project(model, step_layouts, moments, config))
        step_masks = {lay.param: projections[lay.name].mask for lay in step_layouts}
        _write_obs_weights(model, step_layouts, projections)
        apply_masks(model, step_masks)
        masks.update(step_masks)
        timing["projection_s"] += time.perf_counter() - start
    layouts = [
        _unexecuted(lay) if lay.eligible and lay.name not in moments else lay for lay in layouts
    ]
    _require_eligible(model, layouts, config)
    masks = {lay.param: masks[lay.param] for lay in layouts if lay.eligible}

    start = time.perf_counter()
    priors = {name: p.shrinkage for name, p in projections.items() if getattr(p, "shrinkage", 0)}
    compensation = _compensate(reference, model, images, masks, config, moments, priors)
    timing["compensation_s"] = time.perf_counter() - start

    start = time.perf_counter()
    sparse_logits = _logits(model, images, config.batch_size)
    certificate = _certificate(dense_logits, sparse_logits)
    timing["certificate_s"] = time.perf_counter() - start

    report = build_report(
        model,
        layouts,
        projections,
        permutations,
        certificate,
        config,
        input_shape=input_shape,
        calibration_images=images.shape[0],
        reference_macs=reference_macs,
    )
    report["calibration_budget"] = {
        "images": int(calib_images.shape[0]),
        "read": int(images.shape[0]),
        "calib_macs": config.calib_macs,
    }
    if config.permute:  # the images whose energies ranked the channels (a seeded subset if capped)
        report["calibration_budget"]["permutation"] = permutation_images
    report["timing_s"] = {key: round(value, 3) for key, value in timing.items()}
    report["compensation"] = compensation
    return SparsifyResult(model, report, headline_of(report), masks)


def budget_images(
    model: nn.Module, have: int, config: SparsityConfig, input_shape: tuple[int, ...]
) -> int:
    """How many of `have` calibration images the stage reads under `config.calib_macs`."""
    if config.calib_macs is None or have <= MIN_BUDGET_IMAGES:
        return have
    from mpdeploy.prune.macs import count_macs, images_within

    per_image = float(count_macs(model, (1, *input_shape)).total_macs)
    count = images_within(config.calib_macs, per_image, have, MIN_BUDGET_IMAGES)
    if count < have:
        log.info(
            "sparsify: the calibration passes read %d of the %d images (MAC budget, "
            "docs/pruning.md)",
            count,
            have,
        )
    return count


def _compensate(
    reference, model, images, masks, config: SparsityConfig, moments, priors
) -> dict[str, Any]:
    """Re-fit the kept weights of every masked layer (`prune/compensate.py`), masks kept;
    `priors` (obs_shrink's ρ per layer): the fit on the same shrunk moment (`LayerFit.prior`).

    After `obs` the input Grams it captured on the dense model are those the re-fit needs (same
    images, every row): layers whose columns are in weight order (Linear, 1×1 conv) and whose
    capture took every row get their statistics from them, and the re-fit's own pass reads only
    the others (none on a ViT)."""
    from mpdeploy.prune.compensate import (
        CompensateConfig,
        GramStatistics,
        compensate,
        masked_layers,
    )

    if reference is None:
        return {"method": "none", "layers": {}}
    cfg = CompensateConfig(
        config.compensate,
        batch_size=config.batch_size,
        seed=config.seed,
        inputs=config.compensate_inputs,
    )
    known = None
    # one capture, on the dense (permuted) model = reference; a re-fit on other inputs reads its own
    if config.method in OBS_METHODS and config.compensate_inputs == "dense":
        grams = {
            name: (h.gram, h.sum_x, h.rows)
            for name, h in moments.items()
            if h.rows < cfg.max_rows and _columns_in_weight_order(reference.get_submodule(name))
        }
        known = GramStatistics(reference, grams)
    layers = [
        dataclasses.replace(layer, prior=priors.get(layer.name, 0.0))
        for layer in masked_layers(masks)
    ]
    record = compensate(reference, model, images, layers, cfg, known=known)
    apply_masks(model, masks)  # the fit keeps them; re-applied against rounding in the copy
    return record


def _columns_in_weight_order(module: nn.Module) -> bool:
    """An OBS Gram's columns (kernel pixel major, Cin minor) are weight.reshape(out, -1)'s."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _capture_obs(model, names, images, config: SparsityConfig, groups):
    """OBS: every layer's input Gram matrix (one dense pass per ~1 GB of them), and the logits;
    for `obs_shrink` also their scatter over folds of the calibration images (`groups`)."""
    from mpdeploy.prune.compensate import CompensateConfig
    from mpdeploy.prune.obs import capture_hessians, fold_ids

    rows = CompensateConfig().max_rows  # the rows the least-squares re-fit will see
    hessians = capture_hessians(
        model,
        names,
        images,
        max_rows=rows,
        seed=config.seed,
        batch_size=config.batch_size,
        logit_weighted=config.method == "obs_fisher",
        folds=fold_ids(groups, images.shape[0]) if config.method == "obs_shrink" else None,
    )
    return hessians, _logits(model, images, config.batch_size)


def _write_obs_weights(model, layouts, projections) -> None:
    """OBS also re-fits the kept weights (what `--compensate none` then keeps)."""
    with torch.no_grad():
        for lay in layouts:
            weight = getattr(projections[lay.name], "weight", None)
            if weight is not None:
                param = model.get_parameter(lay.param)
                param.copy_(weight.to(param.dtype))


def _project(
    model: nn.Module,
    layouts: list[LayerLayout],
    moments: dict,
    config: SparsityConfig,
) -> dict[str, cast.Projection]:
    if config.method in OBS_METHODS:
        from mpdeploy.prune.obs import obs_project

        centered = config.compensate != "none"  # the re-fit that follows has a free bias
        found = {}
        for lay in layouts:
            if not lay.eligible:
                continue
            hessian = moments[lay.name]
            rho = None
            if config.method == "obs_shrink":
                h, rho = hessian.shrunk(centered=centered)
            else:
                h = hessian.matrix(centered=centered)
            found[lay.name] = obs_project(
                model.get_parameter(lay.param),
                h,
                config.k,
                config.n,
                seed=config.seed,
                rows=hessian.rows,
                shrinkage=rho,
            )
        return found
    return {
        lay.name: cast.project(
            model.get_parameter(lay.param),
            moments[lay.name].mean,
            config.k,
            config.n,
            method=config.method,
            seed=config.seed,
        )
        for lay in layouts
        if lay.eligible
    }


def _steps(names: list[str], mode: str) -> list[list[str]]:
    """The layers captured and projected together, in module order: all, per block or per layer.

    A block is the name up to its last numbered component that is not the layer itself
    (`blocks.3` of `blocks.3.attn.qkv`, `stages.1.blocks.2` of `stages.1.blocks.2.mlp.fc1`,
    `layer1.0` of `layer1.0.downsample.0`); layers with no such component are a step each.
    """
    if mode == "off":
        return [names]
    if mode == "layer":
        return [[name] for name in names]
    steps: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        numbered = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
        steps.setdefault(".".join(parts[: numbered[-1] + 1]) if numbered else name, []).append(name)
    return list(steps.values())


def _require_eligible(model: nn.Module, layouts: list[LayerLayout], config: SparsityConfig) -> None:
    if any(lay.eligible for lay in layouts):
        return
    reasons = sorted({lay.reason for lay in layouts if lay.reason})
    raise UserError(
        f"--sparsity {config.pattern}: no layer of {type(model).__name__} can hold it "
        f"({'; '.join(reasons[:3]) or 'it has no Linear/Conv2d layers'})"
    )


def _unexecuted(lay: LayerLayout) -> LayerLayout:
    reason = "never ran as a module in the calibration pass (weight used elsewhere)"
    return dataclasses.replace(lay, eligible=False, reason=reason)


def _permute(model, images, config, eligible) -> tuple[list[permute.PermutationRecord], int]:
    """Fold the channel permutations into `model`; the records, and how many images' energies
    ranked the channels (0 when the model has no family to permute)."""
    from mpdeploy.families import channel_groups

    try:
        groups = channel_groups(model)
    except UserError as exc:
        log.warning("no channel permutation for k:n: %s", exc)
        return [permute.PermutationRecord("*", "-", "-", False, f"no family: {exc}")], 0
    consumers = sorted(
        {
            g.consumer_module
            for g in groups
            if permute.why_not_permutable(g, config.n, eligible) is None
        }
    )
    subset = _subset(images, config.permute_images, config.seed)
    energy = cast.capture_channel_energy(model, consumers, subset, batch_size=config.batch_size)
    return permute.permute_groups(model, groups, energy, config.n, eligible), subset.shape[0]


def _subset(images: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    if count is None or images.shape[0] <= count:
        return images
    generator = torch.Generator().manual_seed(seed)
    return images[torch.randperm(images.shape[0], generator=generator)[:count].sort().values]


def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        ).float()


def _certificate(dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, Any]:
    from mpdeploy.verify.certificate import margin_certificate

    return margin_certificate(dense.numpy(), sparse.numpy())


# --- accounting -------------------------------------------------------------------------------


def build_report(
    model: nn.Module,
    layouts: list[LayerLayout],
    projections: dict[str, cast.Projection],
    permutations: list[permute.PermutationRecord],
    certificate: dict[str, Any],
    config: SparsityConfig,
    *,
    input_shape: tuple[int, ...],
    calibration_images: int,
    reference_macs: int | None = None,
) -> dict[str, Any]:
    """sparsity.json: per layer pattern, eligibility, achieved sparsity, MACs; totals
    (docs/sparsity.md)."""
    from mpdeploy.prune.macs import count_macs, mac_reduction, sparse_execution_macs
    from mpdeploy.prune.macs import theoretical_speedup as speedup_of

    macs = count_macs(model, (1, *input_shape))
    layer_macs = {layer.name: layer.macs for layer in macs.layers}
    keep = config.k / config.n
    layers = []
    for lay in layouts:
        weight = model.get_parameter(lay.param).detach()
        dense = int(layer_macs.get(lay.name, 0))
        record: dict[str, Any] = {
            "name": lay.name,
            "param": lay.param,
            "kind": lay.kind,
            "shape": list(lay.shape),
            "eligible": lay.eligible,
            "reason": lay.reason,
            "pattern": config.pattern if lay.eligible else "dense",
            "achieved_sparsity": float((weight == 0).double().mean()),
            "dense_macs": dense,
            "sparse_execution_macs": dense * keep if lay.eligible else dense,
            "theoretical_speedup": 1.0 / keep if lay.eligible else 1.0,
        }
        if lay.eligible:
            record["conforms"] = conforms(weight, config.k, config.n)
            record["dropped_output_energy"] = projections[lay.name].dropped_fraction
            rho = getattr(projections[lay.name], "shrinkage", None)
            if rho is not None:  # obs_shrink: how far H was pulled towards (tr H / F)·I
                record["shrinkage"] = rho
        layers.append(record)
    eligible_macs = sum(r["dense_macs"] for r in layers if r["eligible"])
    sparse_macs = sparse_execution_macs(macs.total_macs, eligible_macs, config.k, config.n)
    reduction = mac_reduction(macs.total_macs, sparse_macs)
    eligible_params = [model.get_parameter(r["param"]).detach() for r in layers if r["eligible"]]
    zeros = sum(int((w == 0).sum()) for w in eligible_params)
    combined = {}
    if reference_macs:  # e.g. 2:4 + ToMe against the dense ViT: the paper's "MAC red."
        combined = {
            "reference_macs": reference_macs,
            "total_mac_reduction": mac_reduction(reference_macs, sparse_macs),
        }
    return {
        "pattern": config.pattern,
        "k": config.k,
        "n": config.n,
        "method": config.method,
        "permute": config.permute,
        "include_classifier": config.include_classifier,
        "max_rows": config.max_rows,
        "sequential": config.sequential if config.method == "cast" else "off",
        "seed": config.seed,
        "calibration_images": calibration_images,
        "layout": "TensorRT: Linear along in_features per output row; Conv2d along Cin per "
        "output channel and kernel pixel",
        "mac_model": "1 MAC = 1 multiply-add, measured by mpdeploy.prune.macs.count_macs at "
        f"input {[1, *input_shape]}; attention matmuls and ineligible layers stay dense",
        "layers": layers,
        "permutations": [dataclasses.asdict(p) for p in permutations],
        "totals": {
            "layers": len(layers),
            "sparse_layers": sum(r["eligible"] for r in layers),
            "ineligible_layers": sum(not r["eligible"] for r in layers),
            "eligible_weight_sparsity": zeros / max(1, sum(w.numel() for w in eligible_params)),
            "dense_macs": macs.total_macs,
            "eligible_macs": eligible_macs,
            "sparse_execution_macs": sparse_macs,
            "sparse_mac_reduction": reduction,
            "theoretical_speedup": speedup_of(reduction),
            "permuted_groups": sum(p.permuted for p in permutations),
            **combined,
        },
        "certificate": certificate,
        "polygraphy": None,
    }


def headline_of(report: dict[str, Any]) -> dict[str, Any]:
    totals, cert = report["totals"], report["certificate"]
    return {
        "sparsity_pattern": report["pattern"],
        "sparsity_method": report["method"],
        "sparse_layers": totals["sparse_layers"],
        "ineligible_layers": totals["ineligible_layers"],
        "sparsity_permuted_groups": totals["permuted_groups"],
        "sparse_execution_macs": totals["sparse_execution_macs"],
        "sparse_mac_reduction": totals["sparse_mac_reduction"],
        "theoretical_speedup": totals["theoretical_speedup"],
        **{k: totals[k] for k in ("reference_macs", "total_mac_reduction") if k in totals},
        "sparsity_logit_perturbation_max": cert["max_logit_perturbation"],
        "sparsity_certified_fraction": cert["certified_fraction"],
        "sparsity_top1_agreement": cert["top1_agreement"],
    }


# --- the independent check ----------------------------------------------------------------------


def confirm_with_polygraphy(
    onnx_path: str | os.PathLike,
    build_dir: str | os.PathLike,
    *,
    timeout_s: float = POLYGRAPHY_TIMEOUT_S,
) -> dict[str, Any]:
    """Run `polygraphy inspect sparsity` on the ONNX, record its verdict per weight in sparsity.json.

    A UserError if any layer reported as 2:4 is not confirmed sparse by Polygraphy. Other patterns
    have no TensorRT kernel and no checker: they are recorded as not checkable.
    """
    build_dir = Path(build_dir)
    report_path = build_dir / SPARSITY_JSON
    if not report_path.is_file():
        raise UserError(f"{build_dir} has no {SPARSITY_JSON} (run the sparsify stage first)")
    report = read_json(report_path)
    sparse_layers = [r for r in report["layers"] if r["eligible"]]
    if (report["k"], report["n"]) != NATIVE_PATTERN:
        for layer in report["layers"]:
            layer["polygraphy"] = NOT_CHECKABLE
        report["polygraphy"] = {"verdict": NOT_CHECKABLE}
        write_json(report_path, report)
        return {"polygraphy_sparsity": NOT_CHECKABLE}

    verdicts = run_polygraphy_sparsity(Path(onnx_path), timeout_s=timeout_s)
    matches = match_initializers(Path(onnx_path), build_dir, report["layers"])
    by_param = {
        param: verdicts.get(name, "not checked by Polygraphy (axis not a multiple of 4)")
        for name, param in matches.items()
    }
    for layer in report["layers"]:
        layer["polygraphy"] = by_param.get(layer["param"], "no ONNX weight matched")
    confirmed = [r["name"] for r in sparse_layers if r["polygraphy"] == "sparse"]
    failed = [r["name"] for r in sparse_layers if r["polygraphy"] != "sparse"]
    report["polygraphy"] = {
        "tool": f"polygraphy inspect sparsity ({_polygraphy_version()})",
        "onnx": Path(onnx_path).name,
        "verdict": "pass" if not failed else "fail",
        "tensors": [
            {"onnx": name, "verdict": verdict, "param": matches.get(name)}
            for name, verdict in verdicts.items()
        ],
        "confirmed_layers": len(confirmed),
        "unconfirmed_layers": failed,
    }
    write_json(report_path, report)
    if failed:
        raise UserError(
            f"Polygraphy does not confirm 2:4 in {len(failed)} of {len(sparse_layers)} sparse "
            f"layers of {Path(onnx_path).name} (first: {failed[0]}: {_verdict(report, failed[0])})"
        )
    return {
        "polygraphy_sparsity": "pass",
        "polygraphy_sparse_layers": len(confirmed),
        "polygraphy_sparse_tensors": sum(v == "sparse" for v in verdicts.values()),
    }


def _verdict(report: dict[str, Any], name: str) -> str:
    return next(r["polygraphy"] for r in report["layers"] if r["name"] == name)


def _polygraphy_version() -> str:
    import polygraphy

    return polygraphy.__version__


def run_polygraphy_sparsity(onnx_path: Path, *, timeout_s: float) -> dict[str, str]:
    """ONNX initializer name → "sparse" | "non-sparse", for every tensor Polygraphy checked.

    The CLI runs in a subprocess of this interpreter (the console script's own entry point), so
    the check is the one a user would run, bounded by `timeout_s`.
    """
    entry = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
    command = [sys.executable, "-c", entry, "inspect", "sparsity", str(onnx_path)]
    env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"polygraphy inspect sparsity did not finish within {timeout_s:.0f} s on {onnx_path.name}"
        ) from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = output.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"polygraphy inspect sparsity failed on {onnx_path.name}: {tail[0][:200]}")
    return {m.group(2): m.group(1) for m in _FOUND.finditer(output)}


def match_initializers(
    onnx_path: Path, build_dir: Path, layers: list[dict[str, Any]]
) -> dict[str, str]:
    """ONNX initializer name → torch parameter name for the weights of `layers`.

    By name first (the dynamo exporter keeps `blocks.0.mlp.fc1.weight`); then by content, in
    passes of falling strictness over the weight or its transpose (MatMul constants such as
    `val_51` or `onnx::MatMul_123`): the same values; the same zeros (a Conv with BatchNorm folded
    in scales each output channel but keeps its zeros); a superset of its zeros (a folded
    BatchNorm with zero scale, as in zero-initialised residual branches); the only unmatched weight
    of that shape. A content pass matches only when exactly one parameter qualifies.
    """
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    state = load_file(str(build_dir / "pruned" / "model.safetensors"))
    weights = {r["param"]: state[r["param"]] for r in layers if r["param"] in state}
    proto = onnx.load(str(onnx_path), load_external_data=True)
    arrays = {
        t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) in (2, 4)
    }
    matches = {name: name for name in arrays if name in weights}
    for same in _CONTENT_PASSES:
        for name, array in arrays.items():
            if name in matches:
                continue
            taken = set(matches.values())
            found = {
                param
                for param, view in _views(weights)
                if param not in taken and view.shape == array.shape and same(view, array)
            }
            if len(found) == 1:
                matches[name] = found.pop()
    return matches


def _views(weights: dict[str, np.ndarray]):
    for param, weight in weights.items():
        yield param, weight
        if weight.ndim == 2:
            yield param, weight.T


_CONTENT_PASSES = (
    lambda w, a: np.array_equal(w.astype(a.dtype), a),
    lambda w, a: np.array_equal(w == 0, a == 0),
    lambda w, a: bool(np.all(a[w == 0] == 0)),
    lambda w, a: True,
)
