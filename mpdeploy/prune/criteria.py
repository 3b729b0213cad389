"""Importance criteria: one score per removable unit (a head, a neuron, a channel) of each group.

All criteria share one interface and one planner, so the MP criterion and its baselines are
compared through exactly the same code. Low score = removed first.

- `mp`: the unit's mean squared contribution to its consumer's output on the
  calibration batch, E‖W_out[:, u] · h_u(x)‖² (the paper's ℓ² logit-effect proxy; applied
  to whole units), divided by E‖x_res‖², the per-token/position energy of the residual stream its
  block adds to (input of `group.residual_module`; skipped where that is None, e.g. ResNets): a
  pre-norm LayerNorm divides the stream by its norm, so a change δ matters as δ/‖x‖. Then divided
  by the consumer layer's MP budget weight (docs/spectrum.md): high σ+ ⇒ weight > 1 ⇒ cut more.
- `mp_absolute`: the same without the E‖x_res‖² division (the original `mp`; API only, kept so
  the comparison in docs/pruning.md is reproducible).
- `magnitude`: the squared L2 norm of the unit's parameters (producer rows, norms, consumer
  columns); squared so that it adds up over a unit's channels like the MACs it is divided by.
- `random`: a seeded random removal order: uniform scores times each unit's MAC cost, so that
  the planner's score-per-MAC ranking is uniform too (no preference for expensive units).
- `taylor`: first-order Taylor, mean over images of |Σ h·∂L/∂h| over the unit's channels and
  positions, with L the cross-entropy against the model's own top-1 predictions (no labels, no KD).
- `mp_fisher`: the expected change of the KL distillation loss against the dense logits when the
  unit is replaced by its calibration mean (what `bias` compensation leaves), to second order:
  E[(Σ_{channels∈u, positions} g·(h − μ))²], with g = ∂CE(z, y)/∂h for a label y *sampled* from
  the model's own softmax, so that E_y[g gᵀ] is the Gauss–Newton matrix of KL(p_dense ‖ p) at
  the dense model (no labels needed). Divided by the consumer layer's MP budget weight, as `mp`.
- `fisher`: the same without the budget weight.
- `mp_fisher_split` (default, `PruneConfig.method`): `mp_fisher_taylor` with the label
  expectation in two strata instead of one sampled label: the top-1 class at weight p₁, one
  other class drawn at weight 1 − p₁. A confident model's rare labels no longer decide the plan
  (one draw collapsed a small ViT at 70 %); two backward passes (on a ViT as many as
  `mp_fisher_taylor`, on a CNN one more).
- `mp_fisher_taylor` (the default until 2026-11-29): `mp_fisher`, except that within each
  attention group the heads are removed in `taylor`'s order (the group keeps mp_fisher's score
  values, so the plan's allocation is mp_fisher's); identical to `mp_fisher` on CNNs.
- `mp_taylor`: `taylor` divided by the square root of the MP budget weight.
- `mp_fisher_draws`: `mp_fisher_taylor` with up to eight label draws per image, averaged: the
  same expectation with less noise, as many draws as the score pass's MAC budget leaves (one
  on ViT-B/16). Not the default: it removes a one-draw collapse of a small ViT at 70 % but cost
  efficientnet-lite0 5–8 points of agreement at 30 % (docs/accuracy.md).
- `mp_fisher_robust`: `mp_fisher_taylor` with each unit's score raised by two standard errors
  of its mean over folds of the calibration images (one fold per photo for crops of a few
  photos). Not the default: on a fresh training of a small ViT it collapsed at 70 %
  (docs/accuracy.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families.groups import ChannelGroup


@dataclasses.dataclass(frozen=True)
class ScoringContext:
    calib: torch.Tensor | None  # (N, 3, H, W) preprocessed calibration images
    budget_weights: Mapping[str, float]  # consumer module name → MP budget weight
    unit_macs: Mapping[str, float] = dataclasses.field(default_factory=dict)  # group → MACs/unit
    seed: int = 0
    batch_size: int = 32
    max_rows: int = 4096  # activation rows kept per layer and batch for k×k conv statistics
    # per calibration image its fold (`prune.obs.fold_ids`: the crops of one photo share one),
    # for the between-fold standard error of `mp_fisher_robust`; None: contiguous chunks
    folds: torch.Tensor | None = None
    # label draws per image a Fisher pass may take under the score pass's MAC budget (after
    # the images: `planner.calibration_split`); None: as many as the criterion wants
    max_draws: int | None = None

    def image_folds(self) -> torch.Tensor | None:
        """`folds`, or for distinct images at most 16 contiguous chunks; None without images."""
        from mpdeploy.prune.obs import fold_ids

        if self.folds is not None or self.calib is None:
            return self.folds
        return fold_ids(None, self.calib.shape[0])


class Criterion:
    name: ClassVar[str]
    min_calibration: ClassVar[int] = 0  # images needed
    uses_budget_weights: ClassVar[bool] = False  # scores divided by the MP budget weights
    uses_folds: ClassVar[bool] = False  # scores read the calibration images' folds

    def unit_scores(
        self, model: nn.Module, groups: list[ChannelGroup], ctx: ScoringContext
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def draws_for(self, ctx: ScoringContext) -> int | None:
        """Label draws per image of the criterion's pass; None for a criterion that draws none."""
        return None

    def check(self, ctx: ScoringContext) -> None:
        have = 0 if ctx.calib is None else int(ctx.calib.shape[0])
        if have < self.min_calibration:
            raise UserError(
                f"the {self.name} criterion needs at least {self.min_calibration} calibration "
                f"images (got {have})"
            )


class RandomCriterion(Criterion):
    name = "random"

    def unit_scores(self, model, groups, ctx):
        rng = np.random.default_rng(ctx.seed)
        return {g.name: rng.random(g.units) * ctx.unit_macs.get(g.name, 1.0) for g in groups}


class MagnitudeCriterion(Criterion):
    name = "magnitude"

    def unit_scores(self, model, groups, ctx):
        params = dict(model.named_parameters())
        scores = {}
        for group in groups:
            sq = torch.zeros(group.width, dtype=torch.float64)
            for piece in (*group.producers, *group.consumers):
                if piece.name not in params:  # BatchNorm running statistics are not weights
                    continue
                tensor = params[piece.name].detach().double()
                rows = tensor.narrow(piece.dim, piece.offset, group.width).movedim(piece.dim, 0)
                sq += rows.reshape(group.width, -1).pow(2).sum(1)
            scores[group.name] = sq.view(group.units, group.unit).sum(1).numpy()
        return scores


class MPCriterion(Criterion):
    """E‖W_out[:, u] h_u‖² / E‖x_res‖² / w_ℓ from the within-unit second moments of the consumer
    input and the residual-stream energy at the group's `residual_module` (same calibration pass).

    `residual_normalised = False` (the `mp_absolute` variant) drops the E‖x_res‖² division.
    """

    name = "mp"
    min_calibration = 2
    uses_budget_weights = True
    residual_normalised: ClassVar[bool] = True

    def unit_scores(self, model, groups, ctx):
        moments = {g.name: _SecondMoment(model, g, ctx) for g in groups}
        residuals = {
            g.residual_module: _ResidualEnergy()
            for g in groups
            if self.residual_normalised and g.residual_module is not None
        }

        def observe(group: ChannelGroup, module: nn.Module, x: torch.Tensor) -> None:
            moments[group.name].add(x.detach())

        with (
            torch.no_grad(),
            _consumer_inputs(model, groups, observe),
            _residual_inputs(model, residuals),
        ):
            for batch in _batches(ctx):
                model(batch)
        weights = dict(ctx.budget_weights)
        scores = {}
        for g in groups:
            residual = (
                residuals[g.residual_module].mean() if g.residual_module in residuals else 1.0
            )
            weight = float(weights.get(g.consumer_module, 1.0))
            scores[g.name] = moments[g.name].output_energy() / (residual * weight)
        return scores


class MPAbsoluteCriterion(MPCriterion):
    """The original `mp` score, E‖W_out[:, u] h_u‖² / w_ℓ, without the residual normalisation.

    Kept for reproducing the comparison in docs/pruning.md; not offered by the CLI.
    """

    name = "mp_absolute"
    residual_normalised = False


class TaylorCriterion(Criterion):
    name = "taylor"
    min_calibration = 2

    def unit_scores(self, model, groups, ctx):
        sums = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}

        def observe(group: ChannelGroup, module: nn.Module, x: torch.Tensor) -> None:
            def on_grad(grad: torch.Tensor, x=x.detach(), group=group, module=module) -> None:
                sums[group.name] += _taylor_terms(group, module, x, grad)

            x.register_hook(on_grad)

        n = 0
        with _grad_enabled(model), _consumer_inputs(model, groups, observe):
            for batch in _batches(ctx):
                logits = model(batch)
                loss = nn.functional.cross_entropy(
                    logits, logits.argmax(1).detach(), reduction="sum"
                )
                loss.backward()
                n += batch.shape[0]
        model.zero_grad(set_to_none=True)
        return {name: (total / n).numpy() for name, total in sums.items()}


class MPTaylorCriterion(TaylorCriterion):
    """`taylor` divided by √w_ℓ, the square root of the consumer layer's MP budget weight.

    The budget weight scales squared (energy, second-order) scores; a first-order score grows
    like their square root, so √w keeps MP's share of the ranking the same as in `mp`.
    """

    name = "mp_taylor"
    uses_budget_weights = True

    def unit_scores(self, model, groups, ctx):
        scores = super().unit_scores(model, groups, ctx)
        weights = dict(ctx.budget_weights)
        return {
            g.name: scores[g.name] / np.sqrt(float(weights.get(g.consumer_module, 1.0)))
            for g in groups
        }


class FisherCriterion(Criterion):
    """Second-order KL change of replacing each unit by its mean, from sampled-label gradients.

    Per image i and channel c the pass keeps a_ic = Σ_pos g·h and b_ic = Σ_pos g; with the channel
    mean μ_c known after the pass, the unit's loss change is Σ_{c∈u} (a_ic − μ_c b_ic).
    """

    name = "fisher"
    min_calibration = 2
    temperature: ClassVar[float] = 1.0
    draws: ClassVar[int] = 1  # label draws per image, one backward each, averaged per image

    def unit_scores(self, model, groups, ctx):
        return self._scores(model, groups, ctx, taylor_groups=())[0]

    def draws_for(self, ctx: ScoringContext) -> int:
        """The label draws per image this pass takes: `draws`, fewer if the budget says so."""
        return self.draws if ctx.max_draws is None else max(1, min(self.draws, ctx.max_draws))

    def _scores(
        self,
        model: nn.Module,
        groups: list[ChannelGroup],
        ctx: ScoringContext,
        taylor_groups: list[ChannelGroup],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The Fisher scores of `groups` and, from a second backward pass of the same forward
        (the graph is kept), the `taylor` scores of `taylor_groups`: exactly what a `taylor`
        pass of its own would give, at the cost of a backward instead of a forward and a
        backward."""
        first = {g.name: [] for g in groups}  # per batch (B, width): Σ g·h
        grad_sums = {g.name: [] for g in groups}  # per batch (B, width): Σ g
        means = {g.name: _ChannelMean() for g in groups}
        taylor = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in taylor_groups}
        # which backward is running: "fisher", "taylor", or "both" (a Fisher draw of the top-1
        # labels at temperature 1 is `taylor`'s own loss: one backward serves the two)
        phase = ["fisher"]

        def observe(group: ChannelGroup, module: nn.Module, x: torch.Tensor) -> None:
            means[group.name].add(module, x.detach())

            def on_grad(grad: torch.Tensor, x=x.detach(), group=group, module=module) -> None:
                if phase[0] in ("fisher", "both"):
                    first[group.name].append(_per_sample_channel_sums(module, x * grad).double())
                    grad_sums[group.name].append(_per_sample_channel_sums(module, grad).double())
                if phase[0] in ("taylor", "both") and group.name in taylor:
                    taylor[group.name] += _taylor_terms(group, module, x, grad)

            x.register_hook(on_grad)

        generator = torch.Generator().manual_seed(ctx.seed)
        images, draws = 0, self.draws_for(ctx)
        draw_weights = []  # per batch: each draw's per-image weights (None: 1 / draws)
        with _grad_enabled(model), _consumer_inputs(model, groups, observe):
            for batch in _batches(ctx):
                raw = model(batch)
                logits = raw / self.temperature
                probs = torch.softmax(logits.detach().double(), 1)
                labelled = self._label_draws(probs, generator, draws)
                draw_weights.append([weight for _, weight in labelled])
                top1 = raw.argmax(1).detach()  # `taylor`'s labels: the model's own top-1
                shared = (
                    bool(taylor) and self.temperature == 1.0 and torch.equal(labelled[0][0], top1)
                )
                for draw, (labels, _) in enumerate(labelled):
                    phase[0] = "both" if shared and draw == 0 else "fisher"
                    nn.functional.cross_entropy(logits, labels, reduction="sum").backward(
                        retain_graph=(bool(taylor) and not shared) or draw < draws - 1
                    )
                if taylor and not shared:  # `taylor`'s loss: cross-entropy against the top-1
                    phase[0] = "taylor"
                    nn.functional.cross_entropy(raw, top1, reduction="sum").backward()
                images += batch.shape[0]
        model.zero_grad(set_to_none=True)
        weights = dict(ctx.budget_weights) if self.uses_budget_weights else {}
        scores = {}
        for g in groups:
            mu = means[g.name].mean()
            # per batch (rows, units): the squared loss change, mean over the batch's draws; each
            # backward appended one entry per group, so a batch's draws are `draws` neighbours
            squared = []
            for start in range(0, len(first[g.name]), draws):
                per_draw = [
                    (a - b * mu).view(a.shape[0], g.units, g.unit).sum(2).pow(2)
                    for a, b in zip(
                        first[g.name][start : start + draws],
                        grad_sums[g.name][start : start + draws],
                        strict=True,
                    )
                ]
                squared.append(_weighted_draws(per_draw, draw_weights[start // draws]))
            weight = float(weights.get(g.consumer_module, 1.0))
            scores[g.name] = (self._unit_score(torch.cat(squared), ctx) / weight).numpy()
        return scores, {name: (total / images).numpy() for name, total in taylor.items()}

    def _label_draws(
        self, probs: torch.Tensor, generator: torch.Generator, draws: int
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each draw's labels (one per image) and per-image weights (None: all 1 / draws): `draws`
        independent samples from the model's own softmax."""
        return [
            (torch.multinomial(probs, 1, generator=generator).squeeze(1), None)
            for _ in range(draws)
        ]

    def _unit_score(self, squared: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """(images, units) squared first-order loss changes → each unit's expected one."""
        return squared.mean(0)


class MPFisherCriterion(FisherCriterion):
    name = "mp_fisher"
    uses_budget_weights = True


class MPFisherTaylorCriterion(MPFisherCriterion):
    """`mp_fisher`, with the order of the heads within each attention group taken from `taylor`.

    The Fisher scores still set how many heads each group loses (the group's sorted scores are
    kept, so the plan's allocation is that of `mp_fisher`); only which heads go follows the
    first-order Taylor ranking. On the suite's ViTs the sampled-label Fisher chose heads badly
    and unstably across seeds (vit_t 70 %: 84–91 % val top-1 over seeds 0–2, `taylor` 91.3 %);
    CNNs have no heads and get exactly the `mp_fisher` plan. Both come from one forward pass per
    batch with two backward passes (Fisher's sampled labels, then Taylor's top-1 labels).
    """

    name = "mp_fisher_taylor"

    def unit_scores(self, model, groups, ctx):
        heads = [g for g in groups if g.kind == "attn_heads"]
        scores, order = self._scores(model, groups, ctx, taylor_groups=heads)
        for g in heads:
            reordered = np.empty_like(scores[g.name])
            reordered[np.argsort(order[g.name], kind="stable")] = np.sort(scores[g.name])
            scores[g.name] = reordered
        return scores


class MPFisherDrawsCriterion(MPFisherTaylorCriterion):
    """`mp_fisher_taylor` with eight label draws per image instead of one (eight backward passes
    of the same forward), each unit's squared loss change averaged over the draws.

    One draw per image is an unbiased but noisy estimate of the Gauss–Newton term; at 70 % on a
    small ViT the noise decides the plan: over three draws of one training the default kept 252,
    167 and 238 of 300 val images, eight draws 253, 264 and 259 (docs/accuracy.md, "Eight
    label draws"). Each draw is one more backward pass, so the draws fill what the score
    pass's MAC budget leaves once its images are chosen (`ScoringContext.max_draws`): eight on
    the suite's models and efficientnet-lite0, one on ViT-B/16 or ResNet50, whose images
    already fill it (the prune stage's 2-minute target). Not the default: on efficientnet-lite0
    at 30 % it kept 61.5 % agreement against 69.8 % on val (three draws each)."""

    name = "mp_fisher_draws"
    draws = 8


class MPFisherSplitCriterion(MPFisherTaylorCriterion):
    """`mp_fisher_taylor` with the label expectation split in two strata instead of sampled: the
    model's top-1 class, weighted by its probability p₁, and one label drawn from the other
    classes (renormalised), weighted by 1 − p₁. The estimate of E_y[(g_y·Δ)²] stays unbiased, but
    the term a confident model would almost always draw is now always there with its exact
    weight, and the rare draws of another class, which dominate one sampled label's estimate,
    always happen at their exact weight instead of now and then at full weight. Two backward
    passes per image whatever the budget says (the estimator needs both strata): on a ViT as
    many as `mp_fisher_taylor`, whose `taylor` backward for the heads is the top-1 stratum's
    own; on a CNN (no heads) one more.
    """

    name = "mp_fisher_split"
    draws = 2

    def draws_for(self, ctx: ScoringContext) -> int:
        return self.draws

    def _label_draws(self, probs, generator, draws):
        top = probs.argmax(1)
        rest = probs.scatter(1, top[:, None], 0.0)
        mass = rest.sum(1)
        if probs.shape[1] == 1:
            return [(top, torch.ones_like(mass)), (top, torch.zeros_like(mass))]
        # a row whose other classes underflow to 0 draws any of them, at weight 0
        uniform = torch.ones_like(rest).scatter(1, top[:, None], 0.0)
        rest = torch.where(mass[:, None] > 0, rest, uniform)
        tail = torch.multinomial(rest, 1, generator=generator).squeeze(1)
        return [(top, 1.0 - mass), (tail, mass)]


class MPFisherRobustCriterion(MPFisherTaylorCriterion):
    """`mp_fisher_taylor` with each unit's score raised by `standard_errors` standard errors of
    its mean over folds of the calibration images (the crops of one photo are one fold; distinct
    images are cut into at most 16 contiguous folds, `prune.obs.fold_ids`).

    A unit the calibration images call cheap on average but that some of them need (a late
    channel that answers to a class one photo shows) gets a large spread between folds and is
    kept; where the folds agree the score is `mp_fisher_taylor`'s. The same caution as
    `obs_shrink`'s for 2:4 (docs/pruning.md, "Criteria")."""

    name = "mp_fisher_robust"
    uses_folds = True
    standard_errors: ClassVar[float] = 2.0

    def _unit_score(self, squared: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        folds = ctx.image_folds()
        # a consumer that sees each image as several rows (Swin's windows: B·nW, image-major)
        # gives every row its image's fold
        rows, images = squared.shape[0], folds.shape[0]
        if rows % images:
            raise ValueError(f"{rows} score rows for {images} calibration images")
        folds = folds.repeat_interleave(rows // images)
        labels = torch.unique(folds)
        if labels.numel() < 2:
            return squared.mean(0)
        means = torch.stack([squared[folds == f].mean(0) for f in labels])
        spread = means.std(0) / float(labels.numel()) ** 0.5
        return squared.mean(0) + self.standard_errors * spread


CRITERIA: dict[str, type[Criterion]] = {
    c.name: c
    for c in (
        MPCriterion,
        MPAbsoluteCriterion,
        MPFisherCriterion,
        MPFisherTaylorCriterion,
        MPFisherDrawsCriterion,
        MPFisherSplitCriterion,
        MPFisherRobustCriterion,
        FisherCriterion,
        MagnitudeCriterion,
        RandomCriterion,
        TaylorCriterion,
        MPTaylorCriterion,
    )
}


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UserError(f"unknown pruning method '{name}': choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]()


def _weighted_draws(per_draw: list[torch.Tensor], weights: list[torch.Tensor | None]):
    """One batch's (rows, units) squared loss changes, one per draw → their weighted sum over the
    draws (a plain mean where the weights are None). A consumer that sees an image as several
    rows (Swin's windows, image-major) gives each row its image's weight."""
    if all(w is None for w in weights):
        return torch.stack(per_draw).mean(0)
    total = torch.zeros_like(per_draw[0])
    for values, weight in zip(per_draw, weights, strict=True):
        weight = weight.to(values.dtype).repeat_interleave(values.shape[0] // weight.shape[0])
        total += weight[:, None] * values
    return total


# --- activation statistics ---------------------------------------------------------------------


class _SecondMoment:
    """Accumulates, per unit u, M_u = E[h_u h_uᵀ] of the consumer input (k×k patches for convs)."""

    def __init__(self, model: nn.Module, group: ChannelGroup, ctx: ScoringContext):
        self.group = group
        self.module = model.get_submodule(group.consumer_module)
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.max_rows = ctx.max_rows
        weight = self.module.weight.detach().double()
        # (out, units, features per unit): a unit's channels times its kernel taps
        self.weight = weight.reshape(weight.shape[0], group.units, -1)
        features = self.weight.shape[2]
        self.moment = torch.zeros(group.units, features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        rows = self._rows(x)  # (R, units, features)
        if rows.shape[2] == 1:  # one channel per unit: only the diagonal (einsum is slow here)
            self.moment[:, 0, 0] += rows[:, :, 0].pow(2).sum(0)
        else:
            self.moment += torch.bmm(rows.permute(1, 2, 0), rows.permute(1, 0, 2))
        self.rows += rows.shape[0]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if isinstance(self.module, nn.Linear):
            return x.reshape(-1, g.units, g.unit).double()
        conv = self.module
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), 0):
            return x.permute(0, 2, 3, 1).reshape(-1, g.units, g.unit).double()
        patches = nn.functional.unfold(
            x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
        )  # (B, C·k², L)
        patches = patches.transpose(1, 2).reshape(-1, g.units, self.weight.shape[2])
        if patches.shape[0] > self.max_rows:
            keep = torch.randperm(patches.shape[0], generator=self.generator)[: self.max_rows]
            patches = patches[keep]
        return patches.double()

    def output_energy(self) -> np.ndarray:
        """E‖W[:, u] h_u‖² per unit: Σ_o w_ouᵀ M_u w_ou."""
        moment = self.moment / max(self.rows, 1)
        weight = self.weight.permute(1, 0, 2)  # (units, out, features)
        energy = (torch.bmm(weight, moment) * weight).sum(dim=(1, 2))
        return energy.clamp_min(0).numpy()


class _ChannelMean:
    """Per-channel mean of a consumer input over images and positions, in float64."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
        else:
            rows = x.transpose(0, 1).reshape(x.shape[1], -1).T
        total = rows.sum(0, dtype=torch.float64)  # no float64 copy of the rows
        self.total = total if self.total is None else self.total + total
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


class _ResidualEnergy:
    """E‖x‖² of a residual stream per token / spatial position (sum over channels, mean over
    images and positions), accumulated in float64."""

    def __init__(self) -> None:
        self.total = 0.0
        self.positions = 0

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        per_position = x.detach().double().pow(2).sum(channel_dim)
        self.total += float(per_position.sum())
        self.positions += per_position.numel()

    def mean(self) -> float:
        if self.positions == 0:
            raise RuntimeError("residual module never ran during calibration")
        return max(self.total / self.positions, 1e-30)


def _taylor_terms(
    group: ChannelGroup, module: nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Σ over images of |Σ_{channels∈u, positions} h·∂L/∂h| per unit u, in float64."""
    per_channel = _per_sample_channel_sums(module, x * grad)  # (B, width)
    unit = per_channel.view(per_channel.shape[0], group.units, group.unit).sum(2)
    return unit.abs().double().sum(0)


def _per_sample_channel_sums(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Sum a consumer input over positions: (B, …, C) for Linear, (B, C, H, W) for Conv2d."""
    if isinstance(module, nn.Linear):
        return values.reshape(values.shape[0], -1, values.shape[-1]).sum(1)
    return values.sum(dim=(2, 3))


@contextlib.contextmanager
def _consumer_inputs(
    model: nn.Module,
    groups: list[ChannelGroup],
    observe: Callable[[ChannelGroup, nn.Module, torch.Tensor], None],
) -> Iterator[None]:
    """Call `observe(group, consumer, input)` on every forward of each group's consumer."""
    with _pre_hooks(
        model,
        [
            (group.consumer_module, lambda mod, x, group=group: observe(group, mod, x))
            for group in groups
        ],
    ):
        yield


@contextlib.contextmanager
def _residual_inputs(model: nn.Module, energies: Mapping[str, _ResidualEnergy]) -> Iterator[None]:
    """Accumulate the input energy of each named module (a forward pre-hook per module)."""
    with _pre_hooks(model, [(name, energy.add) for name, energy in energies.items()]):
        yield


@contextlib.contextmanager
def _pre_hooks(model: nn.Module, callbacks) -> Iterator[None]:
    """Call `callback(module, first_input)` before every forward of each named module."""
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, inputs, callback=callback: callback(mod, inputs[0])
        )
        for name, callback in callbacks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _grad_enabled(model: nn.Module) -> Iterator[None]:
    """Autograd for activation gradients only: each forward's input requires grad, the
    parameters do not, so backward skips every weight gradient (about one forward's worth of
    MACs; the criteria read only ∂L/∂h at the consumer inputs)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handle = model.register_forward_pre_hook(
        lambda _module, inputs: (inputs[0].detach().requires_grad_(True), *inputs[1:])
    )
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def _batches(ctx: ScoringContext) -> Iterator[torch.Tensor]:
    images = ctx.calib
    for start in range(0, images.shape[0], ctx.batch_size):
        yield images[start : start + ctx.batch_size]
