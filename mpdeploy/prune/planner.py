"""How much to cut where: a global greedy plan to a MAC target, checked with real MAC counts.

Each group offers its units (heads, neurons, channels) lowest-score first, in chunks that keep its
width a multiple of `round_to` channels (heads: a head count whose width is such a multiple when
the head size allows) and never below one head or 8 channels. All chunks are ranked globally by
score per MAC; a plan is a prefix of that ranking. The prefix is chosen with MAC estimates, then
corrected with `count_macs` on the actually cut model until the reduction is within tolerance.
`prune_model` runs the whole prune stage: score, plan, cut, compensate (`prune/compensate.py`),
measure. With `steps` > 1 the units are chosen in that many steps of equal MAC share, each scored
on the model the previous steps cut and compensated; the final cut and one compensation are then
made from the dense model (docs/pruning.md, "Pruning in steps").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import get_family
from mpdeploy.families.groups import ChannelGroup
from mpdeploy.prune.compensate import (
    DEFAULT_COMPENSATION,
    check_compensate_inputs,
    parse_compensation,
)

log = logging.getLogger(__name__)

MIN_CHANNELS = 8  # never keep fewer neurons/channels in a layer (heads: at least one)
MIN_SCORE_IMAGES = 32  # the score passes read at least this many calibration images (if given)
MIN_COMPENSATE_IMAGES = 64  # compensation and the headline at least this many


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    target_macs: float  # fraction of the dense MACs to remove
    # chosen on the suite's validation split (docs/accuracy.md); `mp_fisher_robust` was the
    # default for half an hour on 2026-11-28 and collapsed on a fresh training (same doc);
    # `mp_fisher_draws` (eight label draws) was the default for half an hour on 2026-11-29: it
    # removes a one-draw collapse of a small ViT at 70 % but cost efficientnet-lite0 5–8 points
    # of agreement at 30 % on val and test (docs/accuracy.md, "Eight label draws");
    # `mp_fisher_split` (the label expectation in two strata) since 2026-11-29 05:45 UTC: the same
    # collapse removed with no backward more on a ViT (one more on a CNN), efficientnet-lite0
    # level (docs/accuracy.md, "Two strata instead of one label")
    method: str = "mp_fisher_split"
    round_to: int = 8
    seed: int = 0
    tolerance: float = 0.01  # |achieved − target| on the MAC-reduction fraction
    batch_size: int = 32  # calibration forward batch for scoring and the headline
    compensate: str = DEFAULT_COMPENSATION  # closed-form re-fit after the cut (compensate.py)
    compensate_inputs: str = "dense"  # CompensateConfig.inputs: "dense" | "pruned" | "sequential"
    # Work budgets of the calibration passes, in dense MACs (see `calibration_split`): the scores'
    # passes (forward + backward) read the first images that fit `score_macs`, compensation and
    # the headline those that fit `compensate_macs`, never fewer than the floors below; None =
    # every image. ViT-B/16 (17.6 GMAC per image): 34 and 68 images; ResNet-50 (4.09 GMAC): 146 and 293.
    score_macs: float | None = 6e11
    compensate_macs: float | None = 1.2e12
    # choose the units in this many steps, re-scoring after each (1 = one shot; each further step
    # costs one more score pass and one compensation of an intermediate model)
    steps: int = 1

    def __post_init__(self):
        parse_compensation(self.compensate)
        check_compensate_inputs(self.compensate_inputs)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"prune steps must be an integer ≥ 1 (got {self.steps!r})")
        for name in ("score_macs", "compensate_macs"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise UserError(f"{name} must be ≥ 0 or None (got {value})")


@dataclasses.dataclass(frozen=True)
class PruneResult:
    model: nn.Module
    spec: Any  # ModelSpec with the kept widths, or None when no spec was given
    plan: dict[str, Any]
    headline: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Units of one group removed together; `priority` = mean score per MAC."""

    group: str
    units: tuple[int, ...]
    score: float
    macs: float
    priority: float


def prune_model(
    model: nn.Module,
    calib: torch.Tensor | None,
    spectrum: Any,
    config: PruneConfig,
    *,
    spec: Any = None,
    input_shape: tuple[int, int, int] | None = None,
    groups: Sequence[Hashable] | None = None,
) -> PruneResult:
    """Remove the lowest-importance units of a copy of `model` until `target_macs` is reached.

    `groups`: per calibration image the photo it was cut from (`CalibrationSet.groups()`, as for
    `sparsify`); criteria that weigh the spread between photos (`mp_fisher_robust`) read it."""
    from mpdeploy.families.surgery import group_widths
    from mpdeploy.prune.criteria import get_criterion
    from mpdeploy.prune.macs import count_macs

    if not 0.0 < config.target_macs < 1.0:
        raise UserError(f"target MAC reduction must lie in (0, 1) (got {config.target_macs})")
    if config.round_to < 1:
        raise UserError(f"round_to must be at least 1 (got {config.round_to})")
    criterion = get_criterion(config.method)
    _check_compensation_inputs(calib, config)
    family = get_family(model)
    model = model.eval()
    if input_shape is None:
        if calib is None:
            raise UserError("prune_model needs input_shape or a calibration batch")
        input_shape = tuple(calib.shape[1:])
    if groups is not None and (calib is None or len(groups) != calib.shape[0]):
        count = 0 if calib is None else calib.shape[0]
        raise UserError(f"{len(groups)} calibration groups for {count} calibration images")
    if config.steps > 1:
        sel, step_log = _select_in_steps(
            model, calib, spectrum, config, input_shape, criterion, groups
        )
    else:
        sel = _select(model, calib, spectrum, config, input_shape, criterion, groups)
        step_log = []
    channel_groups, removed, dense_count, split = (
        sel.groups,
        sel.removed,
        sel.dense_count,
        sel.split,
    )
    comp_calib = None if calib is None else calib[: split["compensate_images"]]
    pruned = _cut(model, channel_groups, removed).eval()
    dense_logits = _DenseLogits(comp_calib)
    with dense_logits.watching(model):  # compensation's dense pass gives the headline's logits
        compensation = _compensate(model, pruned, comp_calib, channel_groups, removed, config)
    pruned_count = sel.counts.get(_plan_key(removed)) or count_macs(pruned, (1, *input_shape))
    widths = group_widths(pruned)
    achieved = 1.0 - pruned_count.total_macs / dense_count.total_macs

    headline = {
        "method": config.method,
        "compensate": config.compensate,
        "target_macs": config.target_macs,
        "dense_macs": dense_count.total_macs,
        "pruned_macs": pruned_count.total_macs,
        "mac_reduction": achieved,
        "dense_params": _params(model),
        "pruned_params": _params(pruned),
    }
    if comp_calib is not None and comp_calib.shape[0] > 0:
        headline.update(
            logit_effect(model, pruned, comp_calib, config.batch_size, dense_logits.logits())
        )
    plan = {
        "method": config.method,
        "family": family.name,
        "target_macs": config.target_macs,
        "tolerance": config.tolerance,
        "round_to": config.round_to,
        "seed": config.seed,
        "budget_weights_from": "spectrum" if sel.ctx.budget_weights else "none (all 1.0)",
        "uses_budget_weights": sel.uses_budget_weights,
        "mac_iterations": sel.trials,
        # for a criterion that reads them (`mp_fisher_robust`), the folds of the scored images:
        # the photos they were cut from, else contiguous chunks
        "calibration": {
            **split,
            "score_folds": _fold_count(sel.ctx) if criterion.uses_folds else None,
            # label draws per image of a Fisher criterion's pass (None: the criterion has none)
            "score_draws": criterion.draws_for(sel.ctx),
        },
        "compensation": compensation,
        "groups": [
            group_record(
                g, sel.scores[g.name], removed.get(g.name, set()), sel.unit_macs[g.name], sel.ctx
            )
            for g in channel_groups
        ],
        "totals": {
            **{k: headline[k] for k in ("dense_macs", "pruned_macs", "mac_reduction")},
            **{k: headline[k] for k in ("dense_params", "pruned_params")},
            "within_tolerance": abs(achieved - config.target_macs) <= config.tolerance,
            "units_removed": sum(len(u) for u in removed.values()),
            "units_total": sum(g.units for g in channel_groups),
        },
    }
    if config.steps > 1:
        plan["steps"] = step_log
    new_spec = spec.with_widths(widths) if spec is not None else None
    return PruneResult(pruned, new_spec, plan, headline)


@dataclasses.dataclass
class _Selection:
    """What one scoring-and-planning pass chose on one model (units of its own groups)."""

    groups: list[ChannelGroup]
    scores: dict[str, np.ndarray]
    unit_macs: dict[str, float]
    removed: dict[str, set[int]]
    trials: list[dict[str, Any]]  # the MAC search's trials (choose_chunks)
    dense_count: Any  # MacCount of the model the pass read
    split: dict[str, Any]
    counts: dict[frozenset, Any]  # MacCount of every plan the search measured
    ctx: Any
    uses_budget_weights: bool


def _fold_count(ctx: Any) -> int | None:
    folds = ctx.image_folds()
    return None if folds is None else int(torch.unique(folds).numel())


def _cut(model: nn.Module, groups: list[ChannelGroup], removed, *, share_weights=False):
    """A copy of `model` without the `removed` units; with `share_weights` the copy shares the
    dense tensors (surgery slices into new tensors and never writes into old ones), for MAC
    trials that need only the cut architecture."""
    from mpdeploy.families.surgery import keep_indices, prune_groups

    tensors = (*model.parameters(), *model.buffers()) if share_weights else ()
    memo = {id(t): t for t in tensors}
    return prune_groups(copy.deepcopy(model, memo), keep_indices(groups, removed))


def _select(
    model: nn.Module,
    calib: torch.Tensor | None,
    spectrum: Any,
    config: PruneConfig,
    input_shape: tuple[int, ...],
    criterion: Any,
    image_groups: Sequence[Hashable] | None = None,
) -> _Selection:
    """Score `model`'s units and choose the chunks that reach `config.target_macs` of its MACs."""
    from mpdeploy.prune.criteria import ScoringContext
    from mpdeploy.prune.macs import count_macs
    from mpdeploy.prune.obs import fold_ids

    family = get_family(model)
    groups = family.channel_groups(model)
    dense_count = count_macs(model, (1, *input_shape))
    unit_macs = estimate_unit_macs(model, groups, family, dense_count)
    split = calibration_split(calib, dense_count.total_macs, config)
    if split["score_images"] < split["images"] or split["compensate_images"] < split["images"]:
        log.info(
            "prune: scores read %d and compensation %d of the %d calibration images "
            "(MAC budgets of the passes, docs/pruning.md)",
            split["score_images"],
            split["compensate_images"],
            split["images"],
        )
    scored = split["score_images"]
    ctx = ScoringContext(
        calib=None if calib is None else calib[:scored],
        budget_weights=budget_weights(spectrum),
        unit_macs=unit_macs,
        seed=config.seed,
        batch_size=config.batch_size,
        folds=None
        if calib is None or image_groups is None
        else fold_ids(list(image_groups)[:scored], scored),
        max_draws=split["score_draws_budget"],
    )
    criterion.check(ctx)
    scores = criterion.unit_scores(model, groups, ctx)
    chunks = rank_chunks(groups, scores, unit_macs, config.round_to)
    counts: dict[frozenset, Any] = {}

    def reduction(removed: dict[str, set[int]]) -> float:
        count = count_macs(_cut(model, groups, removed, share_weights=True), (1, *input_shape))
        counts[_plan_key(removed)] = count
        return 1.0 - count.total_macs / dense_count.total_macs

    selected, trials = choose_chunks(chunks, dense_count.total_macs, config, reduction)
    return _Selection(
        groups,
        scores,
        unit_macs,
        removed_units(selected),
        trials,
        dense_count,
        split,
        counts,
        ctx,
        criterion.uses_budget_weights,
    )


def _select_in_steps(
    model: nn.Module,
    calib: torch.Tensor | None,
    spectrum: Any,
    config: PruneConfig,
    input_shape: tuple[int, ...],
    criterion: Any,
    image_groups: Sequence[Hashable] | None = None,
) -> tuple[_Selection, list[dict[str, Any]]]:
    """`config.steps` selections of equal MAC share (step i reaches i/steps of the target, in
    dense MACs), each on the model the earlier ones cut and compensated, composed into one
    selection of the dense model's units. The MP budget weights are the dense spectrum's (layer
    names do not change); the plan records the first step's scores (the dense model's)."""
    from mpdeploy.prune.macs import count_macs

    first: _Selection | None = None
    kept: dict[str, list[int]] = {}  # group → dense unit indices still kept
    current, done, log_steps, trials = model, 0.0, [], []  # done: share of the dense MACs cut
    for step in range(1, config.steps + 1):
        goal = config.target_macs * step / config.steps
        share = 1.0 - (1.0 - goal) / (1.0 - done)  # of the current model's MACs
        step_config = dataclasses.replace(config, target_macs=share, steps=1)
        sel = _select(current, calib, spectrum, step_config, input_shape, criterion, image_groups)
        trials += [{"step": step, **trial} for trial in sel.trials]
        if first is None:
            first = sel
            kept = {g.name: list(range(g.units)) for g in sel.groups}
        for group in sel.groups:
            gone = sel.removed.get(group.name, set())
            kept[group.name] = [u for i, u in enumerate(kept[group.name]) if i not in gone]
        log_steps.append(
            {
                "step": step,
                "target_macs": round(goal, 6),
                "of_current_macs": round(share, 6),
                "units_removed": sum(len(u) for u in sel.removed.values()),
            }
        )
        if step < config.steps:
            cut = _cut(current, sel.groups, sel.removed).eval()
            comp_calib = None if calib is None else calib[: sel.split["compensate_images"]]
            _compensate(current, cut, comp_calib, sel.groups, sel.removed, step_config)
            # the MAC search has counted this plan already (else count the cut once)
            count = sel.counts.get(_plan_key(sel.removed)) or count_macs(cut, (1, *input_shape))
            done = 1.0 - count.total_macs / first.dense_count.total_macs
            current = cut
    assert first is not None
    removed = {
        g.name: set(range(g.units)) - set(kept[g.name])
        for g in first.groups
        if len(kept[g.name]) < g.units
    }
    return dataclasses.replace(first, removed=removed, counts={}, trials=trials), log_steps


def calibration_split(
    calib: torch.Tensor | None, dense_macs: float, config: PruneConfig
) -> dict[str, Any]:
    """How many of the (seeded, shuffled) calibration images each pass of the stage reads.

    A pass over one image costs about `dense_macs` (the scores' backward passes about as much
    again each); the scores read the first ⌊score_macs / dense_macs⌋ images, at least
    MIN_SCORE_IMAGES, compensation and the headline the first ⌊compensate_macs / dense_macs⌋,
    at least MIN_COMPENSATE_IMAGES, both at most all of them. What the score budget leaves per
    image, ⌊score_macs / (score images · dense_macs)⌋ (at least 1), caps the label draws of a
    Fisher criterion that takes several (`mp_fisher_draws`). Small models use every image; on
    2 CPU cores ViT-B/16 would otherwise spend ~1.2 s per image in the score passes alone.
    """
    from mpdeploy.prune.macs import images_within

    have = 0 if calib is None else int(calib.shape[0])
    score_images = images_within(config.score_macs, dense_macs, have, MIN_SCORE_IMAGES)
    if config.score_macs is None or score_images == 0:
        draws = None
    else:  # what the budget leaves per image once the images are chosen: ≥ 1 draw
        draws = max(1, int(config.score_macs // (score_images * max(dense_macs, 1.0))))
    return {
        "images": have,
        "score_images": score_images,
        "score_draws_budget": draws,
        "compensate_images": images_within(
            config.compensate_macs, dense_macs, have, MIN_COMPENSATE_IMAGES
        ),
        "score_macs_budget": config.score_macs,
        "compensate_macs_budget": config.compensate_macs,
        "dense_macs_per_image": dense_macs,
    }


def _check_compensation_inputs(calib: torch.Tensor | None, config: PruneConfig) -> None:
    have = 0 if calib is None else int(calib.shape[0])
    if config.compensate != "none" and have < 2:
        raise UserError(
            f"--compensate {config.compensate} needs at least 2 calibration images (got {have}); "
            "use --compensate none to prune without calibration data"
        )


def _compensate(
    dense: nn.Module,
    pruned: nn.Module,
    calib: torch.Tensor | None,
    groups: list[ChannelGroup],
    removed: dict[str, set[int]],
    config: PruneConfig,
) -> dict[str, Any]:
    from mpdeploy.prune.compensate import CompensateConfig, compensate, structured_layers

    layers = structured_layers(dense, groups, removed)
    cfg = CompensateConfig(
        config.compensate,
        batch_size=config.batch_size,
        seed=config.seed,
        inputs=config.compensate_inputs,
    )
    return compensate(dense, pruned, calib, layers, cfg)


def budget_weights(spectrum: Any) -> dict[str, float]:
    """Layer name → MP budget weight from a SpectrumReport, a plain mapping, or nothing."""
    if spectrum is None:
        return {}
    if isinstance(spectrum, Mapping):
        return {str(k): float(v) for k, v in spectrum.items()}
    return dict(spectrum.budget_weights())


# --- MAC accounting per unit -------------------------------------------------------------------


def estimate_unit_macs(
    model: nn.Module, groups: list[ChannelGroup], family: Any, dense_count: Any
) -> dict[str, float]:
    """MACs one unit of each group costs, from the per-layer counts of one real forward.

    A weight slice along `dim` costs layer_macs / size(dim) per channel (a fused qkv row, an fc2
    column, a conv filter); the family adds per-channel work outside weights (attention matmuls).
    """
    layer_macs = {layer.name: layer.macs for layer in dense_count.layers}
    positions = {}
    for name, macs in layer_macs.items():
        weight = model.get_submodule(name).weight
        positions[name] = macs / weight.numel()
    params = dict(model.named_parameters())
    out = {}
    for group in groups:
        per_channel = family.extra_channel_macs(group, positions)
        for piece in (*group.producers, *group.consumers):
            module_name, _, attr = piece.name.rpartition(".")
            tensor = params.get(piece.name)
            if attr != "weight" or tensor is None or tensor.ndim < 2:
                continue
            per_channel += layer_macs.get(module_name, 0) / tensor.shape[piece.dim]
        out[group.name] = per_channel * group.unit
    return out


# --- the greedy plan ---------------------------------------------------------------------------


def unit_step(group: ChannelGroup, round_to: int) -> int:
    """Units removed at a time so kept widths stay multiples of `round_to` channels."""
    if group.unit == 1:
        return round_to
    return round_to // math.gcd(round_to, group.unit)  # heads: 1 when head_dim is a multiple


def min_kept_units(group: ChannelGroup, round_to: int) -> int:
    step = unit_step(group, round_to)
    floor = max(group.min_units, 1 if group.unit > 1 else MIN_CHANNELS)
    return min(group.units, step * math.ceil(floor / step))


def rank_chunks(
    groups: list[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    unit_macs: Mapping[str, float],
    round_to: int,
) -> list[Chunk]:
    """Every group's removable chunks (lowest scores first), ranked globally by score per MAC."""
    chunks = []
    for group in groups:
        score = np.asarray(scores[group.name], dtype=np.float64)
        if score.shape != (group.units,):
            raise UserError(
                f"criterion gave {score.shape} scores for {group.units} units of {group.name}"
            )
        order = np.argsort(score, kind="stable")
        step = unit_step(group, round_to)
        removable = group.units - min_kept_units(group, round_to)
        first = group.units % step or step
        start = 0
        size = first
        while start + size <= removable:
            units = tuple(int(u) for u in order[start : start + size])
            total = float(score[list(units)].sum())
            macs = unit_macs[group.name] * size
            chunks.append(Chunk(group.name, units, total, macs, total / max(macs, 1e-12)))
            start += size
            size = step
    index = {g.name: i for i, g in enumerate(groups)}
    tier = {g.name: plan_tier(g) for g in groups}
    # stable within a group: its chunks come in ascending score order, so any prefix is valid
    return sorted(chunks, key=lambda c: (tier[c.group], c.priority, index[c.group]))


def plan_tier(group: ChannelGroup) -> int:
    """Groups of a higher tier are cut only after every chunk of the lower tiers is ranked.

    0 unless the family marks the group (`plan_tier` attribute), e.g. EfficientNet's blocks
    without a skip connection (`families.efficientnet.SkiplessGroup`): their chunks come after
    all others, so a target that the other groups can reach leaves them whole, and a deeper
    target still reaches them.
    """
    return int(getattr(group, "plan_tier", 0))


def choose_chunks(
    chunks: list[Chunk],
    dense_macs: float,
    config: PruneConfig,
    reduction: Callable[[dict[str, set[int]]], float],
    max_trials: int = 12,
) -> tuple[list[Chunk], list[dict[str, Any]]]:
    """The chunks to remove: the ranking's prefix closest to the target, refined at the boundary.

    A prefix can straddle the target when the next chunk is large (a head is ~50 MLP neurons of
    MACs on a narrow ViT); then the plan is completed with later, smaller chunks (`fill`) or
    trimmed back from the prefix past the target (`trim`): the one within half the tolerance, or
    else the one that removes less score.
    A target that no plan meets within `config.tolerance` is a `UserError`, never a silent miss.
    """
    measured, lo, hi = _search_prefix(chunks, dense_macs, config, reduction, max_trials)
    target, tolerance = config.target_macs, config.tolerance
    trials = [{"chunks": n, "mac_reduction": measured[n]} for n in sorted(measured)]
    best = min(measured, key=lambda n: (abs(measured[n] - target), n))
    if abs(measured[best] - target) <= tolerance:
        return chunks[:best], trials
    measure_all = measured.get(len(chunks)) or reduction(removed_units(chunks))
    if measure_all < target - tolerance:
        raise UserError(
            f"target MAC reduction {target:.0%} is out of reach: removing everything allowed "
            f"(≥1 head, ≥{MIN_CHANNELS} channels per layer, multiples of {config.round_to}) "
            f"gives {measure_all:.1%}"
        )
    candidates = []
    for name, selected in (
        ("fill", _fill(chunks, lo, measured[lo], dense_macs, target)),
        ("trim", _trim(chunks, hi, measured.get(hi, measure_all), dense_macs, target)),
    ):
        value = reduction(removed_units(selected))
        trials.append({"chunks": len(selected), "refined": name, "mac_reduction": value})
        if abs(value - target) <= tolerance:
            off = abs(value - target) > tolerance / 2  # the prefix search's own aim first
            candidates.append((off, sum(c.score for c in selected), selected))
    if not candidates:
        closest = min((t["mac_reduction"] for t in trials), key=lambda v: abs(v - target))
        raise UserError(
            f"target MAC reduction {target:.0%} cannot be met within ±{tolerance:.1%} with "
            f"round_to={config.round_to} (closest plan: {closest:.1%}); choose another target"
        )
    return min(candidates, key=lambda c: c[:2])[2], trials


def _search_prefix(chunks, dense_macs, config, reduction, max_trials):
    """Measured reductions of the prefixes tried, bracketing the target: lo below, hi at/above.

    Starts from the MAC estimate, then narrows the bracket with measured reductions (a measured
    reduction only grows with the prefix), interpolating on the estimated curve.
    """
    estimated = np.concatenate([[0.0], np.cumsum([c.macs for c in chunks])]) / dense_macs
    target = config.target_macs
    lo, hi = 0, len(chunks)  # measured(lo) < target ≤ measured(hi) once known
    measured: dict[int, float] = {}

    def measure(k: int) -> float:
        if k not in measured:
            measured[k] = reduction(removed_units(chunks[:k]))
        return measured[k]

    goal = target
    k = int(np.searchsorted(estimated, goal))
    for _ in range(max_trials):
        k = min(max(k, lo), hi)
        value = measure(k)
        if abs(value - target) <= config.tolerance / 2 or hi - lo <= 1:
            break
        if value < target:
            lo = k
        else:
            hi = k
        goal += target - value  # shift the estimate by the measured error
        k = int(np.searchsorted(estimated, goal))
        if not lo < k < hi:
            k = (lo + hi) // 2
    if lo not in measured:
        measure(lo)
    return measured, lo, hi


def _fill(chunks: list[Chunk], lo: int, start: float, dense_macs: float, target: float):
    """The prefix `lo` plus later chunks in rank order that do not pass the target.

    A chunk that would pass it closes its group, so every group still loses its lowest-scored
    units first (and its first, odd-sized chunk before the others).
    """
    selected, closed, value = list(chunks[:lo]), set(), start
    for chunk in chunks[lo:]:
        if value >= target:
            break
        if chunk.group in closed:
            continue
        if value + chunk.macs / dense_macs <= target:
            selected.append(chunk)
            value += chunk.macs / dense_macs
        else:
            closed.add(chunk.group)
    return selected


def _trim(chunks: list[Chunk], hi: int, start: float, dense_macs: float, target: float):
    """The prefix `hi` less its best-ranked removals that leave the reduction at the target or above.

    Only a group's last removed chunk can be given back (its removals stay a prefix of its order).
    """
    kept_back, locked, value = set(), set(), start
    for index in range(hi - 1, -1, -1):
        chunk = chunks[index]
        if value <= target:
            break
        if chunk.group in locked:
            continue
        if value - chunk.macs / dense_macs >= target:
            kept_back.add(index)
            value -= chunk.macs / dense_macs
        else:
            locked.add(chunk.group)
    return [c for i, c in enumerate(chunks[:hi]) if i not in kept_back]


def removed_units(chunks: list[Chunk]) -> dict[str, set[int]]:
    removed: dict[str, set[int]] = {}
    for chunk in chunks:
        removed.setdefault(chunk.group, set()).update(chunk.units)
    return removed


def group_record(
    group: ChannelGroup,
    scores: np.ndarray,
    removed: set[int],
    unit_macs: float,
    ctx: Any,
) -> dict[str, Any]:
    kept = [u for u in range(group.units) if u not in removed]
    gone = sorted(removed)
    return {
        "name": group.name,
        "kind": group.kind,
        "consumer": group.consumer_module,
        "budget_weight": float(ctx.budget_weights.get(group.consumer_module, 1.0)),
        "unit": group.unit,
        "width_before": group.width,
        "width_after": len(kept) * group.unit,
        "units_kept": kept,
        "units_removed": gone,
        "macs_per_unit": unit_macs,
        "max_removed_score": float(max(scores[gone])) if gone else None,
        "min_kept_score": float(min(scores[kept])) if kept else None,
        "scores": [float(s) for s in scores],
    }


# --- what the cut did to the logits ------------------------------------------------------------


def logit_effect(
    dense: nn.Module,
    pruned: nn.Module,
    calib: torch.Tensor,
    batch_size: int,
    dense_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-sample ‖Δlogits‖∞ on the calibration batch and the margin certificate
    (docs/pruning.md).

    `dense_logits`: the dense model's logits on `calib` where a pass already computed them.
    """
    from mpdeploy.verify.certificate import margin_certificate

    with torch.inference_mode():
        if dense_logits is None:
            dense_logits = torch.cat([dense(b) for b in calib.split(batch_size)])
        ref = dense_logits.double().numpy()
        out = torch.cat([pruned(b) for b in calib.split(batch_size)]).double().numpy()
    cert = margin_certificate(ref, out)
    return {
        "logit_perturbation_max": cert["max_logit_perturbation"],
        "logit_perturbation_median": cert["median_logit_perturbation"],
        "certified_fraction": cert["certified_fraction"],
        "top1_agreement_calib": cert["top1_agreement"],
        "calibration_images": cert["samples"],
    }


class _DenseLogits:
    """The dense model's logits on `calib`, kept from a pass that runs anyway (compensation's
    statistics) instead of a pass of their own: a forward hook on the model keeps every output
    whose input is a slice of `calib` (same storage, dtype, shape and strides)."""

    def __init__(self, calib: torch.Tensor | None):
        self.calib = calib
        self.parts: dict[int, torch.Tensor] = {}  # first image index → logits

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        handle = model.register_forward_hook(self._keep)
        try:
            yield
        finally:
            handle.remove()

    def _keep(self, _module: nn.Module, inputs: tuple, output: Any) -> None:
        calib = self.calib
        x = inputs[0] if inputs else None
        if calib is None or not (torch.is_tensor(x) and torch.is_tensor(output)):
            return
        if x.dtype != calib.dtype or x.shape[1:] != calib.shape[1:] or x.stride() != calib.stride():
            return
        if x.untyped_storage().data_ptr() != calib.untyped_storage().data_ptr():
            return
        start, rest = divmod(x.storage_offset() - calib.storage_offset(), calib.stride(0))
        if rest == 0 and start >= 0 and start + x.shape[0] <= calib.shape[0]:
            self.parts[start] = output.detach()

    def logits(self) -> torch.Tensor | None:
        """Every calibration image's logits in order; None where the passes did not cover all."""
        if self.calib is None:
            return None
        out, at = [], 0
        while at < self.calib.shape[0]:
            part = self.parts.get(at)
            if part is None or part.shape[0] == 0:
                return None
            out.append(part)
            at += part.shape[0]
        return torch.cat(out)


def _plan_key(removed: Mapping[str, set[int]]) -> frozenset:
    return frozenset((group, frozenset(units)) for group, units in removed.items() if units)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
