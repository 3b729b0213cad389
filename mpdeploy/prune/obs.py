"""OBS k:n projection: per group, the pattern whose removal costs least once the rest is re-fitted.

CAST (`cast.py`) scores a group's drop pattern by rᵀ C_g r with C_g the group's own 4×4 input
moment: it ignores that the kept weights — of the group and of every other group of the row — are
re-fitted afterwards (`compensate.py`'s `lsq`), and that a conv's neighbouring kernel pixels and
channels are strongly correlated, so a dropped weight is often cheap to restore elsewhere. The
Optimal Brain Surgeon cost accounts for both: with H = XᵀX the layer's input second moment over
all its im2col columns (in TensorRT's order: kernel pixel major, Cin minor, so groups are n
consecutive columns) and H⁻¹ = UᵀU (U upper triangular), removing the set D of group g while the
columns from g onward stay free costs

    w_Dᵀ [B_DD]⁻¹ w_D,    B = U_gᵀ U_g,  U_g = U[g, g] (the group's n×n diagonal block of U),

(B is the group's block of the inverse of H restricted to the columns from g on) and the optimal
update of those columns is ΔW[:, g:] = −E U[g, g:], e = U_g[:, D] [B_DD]⁻¹ w_D. Groups are taken
left to right (SparseGPT's column order; earlier groups stay frozen), each choosing exactly among
all C(n, k) patterns — the k:n version of SparseGPT's mask selection with its diagonal saliency
w²/[H⁻¹]_jj replaced by the exact per-group cost. Updates are applied lazily per column block.

H is centred (the input covariance) when the fit that follows has a free bias, ridge-damped by
`damp` × its mean diagonal. A layer with fewer calibration rows than live input columns (a ResNet's
last stage at 1×1 on 32-px digits: 128 rows for 256 live columns) has a singular H whose choices
fit the calibration rows rather than the data: it gets H = I, i.e. magnitude, as the `lsq` re-fit
falls back to `bias` there. The returned weight holds the OBS-updated kept values (used as is with
`--compensate none`; `lsq` re-fits them exactly for the chosen mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from mpdeploy.prune.cast import _RowQuota, candidate_patterns, sample_rows
from mpdeploy.prune.layout import grouped, ungrouped

BLOCK_COLUMNS = 128  # lazy-update block, rounded down to a multiple of n
HESSIAN_BYTES = 1 << 30  # float64 Gram matrices held at once; more layers → more passes


@dataclasses.dataclass
class Hessian:
    """Σ x xᵀ and Σ x over sampled input rows of one layer, columns in TensorRT's group order."""

    gram: torch.Tensor  # (F, F) float64
    sum_x: torch.Tensor  # (F,) float64
    rows: int = 0

    def matrix(self, *, centered: bool) -> torch.Tensor:
        """The mean second moment (or covariance, when `centered`), float64."""
        rows = max(self.rows, 1)
        h = self.gram / rows
        if centered:
            mean = self.sum_x / rows
            h = h - torch.outer(mean, mean)
        return h


def _features(module: nn.Module) -> int:
    return module.weight[0].numel()


def capture_hessians(
    model: nn.Module,
    layer_names: Iterable[str],
    images: torch.Tensor,
    *,
    max_rows: int = 16384,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Hessian]:
    """The input Gram matrix of each named layer over `images` (dense pass), in group order.

    Layers are captured in as many passes as keep ≤ HESSIAN_BYTES of Gram matrices alive; a layer
    whose forward never runs as a module is absent from the result.
    """
    names = list(layer_names)
    steps, step, size = [], [], 0
    for name in names:
        features = _features(model.get_submodule(name))
        if step and size + 8 * features**2 > HESSIAN_BYTES:
            steps.append(step)
            step, size = [], 0
        step.append(name)
        size += 8 * features**2
    if step:
        steps.append(step)
    hessians: dict[str, Hessian] = {}
    for step in steps:
        hessians.update(_capture(model, step, images, names, max_rows, seed, batch_size))
    return hessians


def _capture(model, step, images, names, max_rows, seed, batch_size) -> dict[str, Hessian]:
    quotas = {name: _RowQuota(images.shape[0], max_rows, seed + names.index(name)) for name in step}
    found: dict[str, Hessian] = {}

    def hook(name: str):
        def pre(module, args):
            _, rows = sample_rows(module, args[0].detach(), quotas[name])  # (rows, pixels, Cin)
            rows = rows.reshape(rows.shape[0], -1)  # pixel-major, Cin-minor: the group order
            record = found.get(name)
            if record is None:
                features = rows.shape[1]
                record = found[name] = Hessian(
                    torch.zeros(features, features, dtype=torch.float64),
                    torch.zeros(features, dtype=torch.float64),
                )
            record.gram += rows.T @ rows
            record.sum_x += rows.sum(0)
            record.rows += rows.shape[0]

        return pre

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in step]
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                model(images[i : i + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclasses.dataclass(frozen=True)
class ObsProjection:
    mask: torch.Tensor  # bool, the weight's shape
    weight: torch.Tensor  # the OBS-updated weight (zeros where the mask is False)
    dropped_energy: float  # Σ over rows of the OBS cost (output error on the moment H)
    total_energy: float  # Σ over rows of wᵀ H w

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_energy / self.total_energy if self.total_energy > 0 else 0.0


def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U upper with (H + λI)⁻¹ = UᵀU, and the mask of dead columns (zero variance)."""
    h = h.clone()
    dead = h.diagonal() <= 0
    lam = damp * float(h.diagonal()[~dead].mean()) if bool((~dead).any()) else damp
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h.diagonal().add_(lam)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(lam * 10**attempt + 1e-12)
    inverse = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inverse, upper=True), dead


def obs_project(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    k: int,
    n: int,
    *,
    damp: float = 0.01,
    seed: int = 0,
    rows: int | None = None,
) -> ObsProjection:
    """The k:n mask of `weight` in TensorRT's layout chosen group by group by the OBS cost.

    `hessian` (F, F) is the input second moment in group order (`capture_hessians`) over `rows`
    calibration rows (fewer rows than live columns: H = I, magnitude). Exact over
    all C(n, k) patterns; above cast.EXACT_LIMIT over the seeded sample plus, per row, the pattern
    of the largest w²/[B]_jj (SparseGPT's saliency).
    """
    shape = tuple(weight.shape)
    w = grouped(weight.detach().double(), n)  # (out, pixels, G, n)
    out = w.shape[0]
    W = w.reshape(out, -1).clone()
    features = W.shape[1]
    live = int((hessian.diagonal() > 0).sum())
    if rows is not None and rows < live:  # H singular: its choices would fit noise (see module)
        hessian = torch.eye(features, dtype=torch.float64)
    U, _ = _inverse_factor(hessian.double(), damp)
    h_damped = hessian.double()
    total = float(torch.einsum("oi,ij,oj->", W, h_damped, W))
    patterns, sampled = candidate_patterns(k, n, seed=seed)
    drop_idx = torch.stack([(~p).nonzero().squeeze(1) for p in patterns])  # (P, n-k)
    keep = torch.ones(out, features, dtype=torch.bool)
    dropped = 0.0
    block = max(n, (BLOCK_COLUMNS // n) * n)
    rows = torch.arange(out)
    for b0 in range(0, features, block):
        b1 = min(b0 + block, features)
        err = torch.zeros(out, b1 - b0, dtype=torch.float64)
        for j in range(b0, b1, n):
            ug = U[j : j + n, j : j + n]
            bmat = ug.T @ ug  # (n, n): the group's block of (H restricted to columns ≥ j)⁻¹
            wg = W[:, j : j + n]
            sub = bmat[drop_idx.unsqueeze(2), drop_idx.unsqueeze(1)]  # (P, d, d)
            inv = torch.linalg.inv(sub)
            wd = wg[:, drop_idx]  # (out, P, d)
            cost = torch.einsum("opi,pij,opj->op", wd, inv, wd)
            best_cost, best = cost.min(dim=1)
            chosen_d = drop_idx[best]  # (out, d)
            chosen_inv = inv[best]  # (out, d, d)
            if sampled:
                chosen_d, chosen_inv, best_cost = _prefer_saliency(
                    wg, bmat, k, chosen_d, chosen_inv, best_cost
                )
            coeff = torch.einsum("oij,oj->oi", chosen_inv, wg[rows[:, None], chosen_d])
            e = torch.einsum("oij,oj->oi", ug[:, chosen_d].permute(1, 0, 2), coeff)
            W[:, j:b1] -= e @ U[j : j + n, j:b1]
            kept = torch.ones(out, n, dtype=torch.bool)
            kept[rows[:, None], chosen_d] = False
            wg_now = W[:, j : j + n]
            wg_now[~kept] = 0.0
            keep[:, j : j + n] = kept
            err[:, j - b0 : j - b0 + n] = e
            dropped += float(best_cost.sum())
        if b1 < features:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    new_weight = ungrouped(W.reshape(w.shape), shape).to(weight.dtype)
    mask = ungrouped(keep.reshape(w.shape), shape)
    return ObsProjection(mask, new_weight * mask, dropped, total)


def _prefer_saliency(wg, bmat, k, chosen_d, chosen_inv, best_cost):
    """Sampled patterns only: also try each row's top-k of w²/B_jj (SparseGPT's mask)."""
    n = wg.shape[1]
    saliency = wg.pow(2) / bmat.diagonal().clamp_min(1e-30)
    alt = saliency.argsort(dim=1)[:, : n - k].sort(dim=1).values  # dropped: least salient
    sub = bmat[alt.unsqueeze(2), alt.unsqueeze(1)]
    inv = torch.linalg.inv(sub)
    wd = torch.gather(wg, 1, alt)
    cost = torch.einsum("oi,oij,oj->o", wd, inv, wd)
    better = cost < best_cost
    return (
        torch.where(better[:, None], alt, chosen_d),
        torch.where(better[:, None, None], inv, chosen_inv),
        torch.where(better, cost, best_cost),
    )
