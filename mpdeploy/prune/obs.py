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

`obs_fisher` (issue 11 item 5: "weight CAST by what reaches the logits") uses the same search on
H = E[x xᵀ] + E_a[x xᵀ], the uniform moment plus the moment with each calibration row t weighted by
a_t = ‖∂CE(z, y)/∂o_t‖² at the layer's output (y sampled from the model's own softmax; cast.py's
`cast_fisher` weight, the Gauss–Newton weight of KL(p_dense ‖ p) on that row), each normalised by
its total weight. The first term is what the `lsq` re-fit minimises, the second what the logits
see; the sum keeps the few rows a confident model's sampled gradients single out from dominating
(the failure of `cast_fisher` on the ResNets, docs/sparsity.md).

`obs_shrink` runs the same search on H shrunk towards a multiple of the identity by as much as the
calibration set leaves it uncertain (Ledoit & Wolf, "A well-conditioned estimator for
large-dimensional covariance matrices", 2004): H ← (1 − ρ)·H + ρ·(tr H / F)·I with

    ρ = Σᵢⱼ Var̂(H̄ᵢⱼ) / Σᵢⱼ (Hᵢⱼ − μδᵢⱼ)²,   μ = tr H / F,  clipped to [0, 1],

the sampling variance of the mean moment estimated from the scatter of its per-fold means, a fold
being the calibration images cut from one photo (crops of one photo are not independent samples)
or, for distinct images, one of at most MAX_FOLDS contiguous chunks. ρ = 0 is `obs`; ρ = 1 is the
identity, i.e. magnitude's choice. Where a few photos cannot pin a layer's statistics down (the
late stages of an ImageNet network calibrated on 14 photos) the choice leans on the weights;
where they can (calibration from the evaluation's distribution) it stays `obs`. The `lsq` re-fit
that follows minimises the output error on the same shrunk moment (`compensate.LayerFit.prior`:
a ridge pulling the kept weights towards the dense ones), so it does not undo the caution
(docs/sparsity.md, "`obs_shrink`").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.prune.cast import _RowQuota, batch_rows, candidate_patterns, sample_rows
from mpdeploy.prune.layout import grouped, ungrouped

BLOCK_COLUMNS = 128  # lazy-update block, rounded down to a multiple of n
HESSIAN_BYTES = 1 << 30  # float64 Gram matrices held at once; more layers → more passes
MAX_FOLDS = 16  # folds of distinct calibration images for obs_shrink's between-fold scatter


@dataclasses.dataclass
class Hessian:
    """Σ x xᵀ and Σ x over sampled input rows of one layer, columns in TensorRT's group order.

    With `logit` set (`capture_hessians(..., logit_weighted=True)`) it also holds the same sums
    with every row weighted by its output-gradient energy (`LogitWeighted`), and `matrix` is the
    sum of the two normalised moments.
    """

    gram: torch.Tensor  # (F, F) float64
    sum_x: torch.Tensor  # (F,) float64
    rows: int = 0
    logit: LogitWeighted | None = None
    folds: FoldScatter | None = None  # capture_hessians(..., folds=...): obs_shrink's statistics

    def matrix(self, *, centered: bool) -> torch.Tensor:
        """The mean second moment (or covariance, when `centered`), float64; with `logit`, plus
        the logit-weighted one (each normalised by its own total weight)."""
        h = _moment(self.gram, self.sum_x, float(max(self.rows, 1)), centered)
        if self.logit is not None and self.logit.weight > 0:
            h = h + _moment(self.logit.gram, self.logit.sum_x, self.logit.weight, centered)
        return h

    def shrinkage(self, *, centered: bool) -> float:
        """ρ of the module docstring for `matrix(centered=...)`: the between-fold estimate of
        Σᵢⱼ Var(Hᵢⱼ) over H's squared distance from (tr H / F)·I; 0 without two folds.

        Fold f (n_f of the N rows, weight w_f = n_f / N) has the mean moment M_f = S_f / n_f and
        mean m_f; uncentred, H = Σ_f w_f M_f and Σ_f w_f ‖M_f − H‖² = Σ_f n_f ‖M_f‖² / N − ‖H‖²;
        centred, the same scatter of the fold covariances C_f = M_f − m_f m_fᵀ around their mean
        C̄ = Σ_f w_f C_f (the pooled covariance less the scatter of the fold means, which is not
        sampling noise of a covariance). Divided by K − 1 it estimates the total variance of the
        mean over K folds (exactly the usual estimate when the folds are equal).
        """
        return self._intensity(self.matrix(centered=centered), centered)

    def _intensity(self, h: torch.Tensor, centered: bool) -> float:
        folds = self.folds
        if folds is None or folds.count < 2 or self.rows == 0:
            return 0.0
        mean = self.gram / self.rows
        if centered:
            weights = torch.tensor(folds.rows, dtype=torch.float64) / self.rows
            means = torch.stack(folds.means)  # (K, F)
            within = mean - (means.T * weights) @ means
            scatter = folds.centered_square_sum / self.rows - float(within.pow(2).sum())
        else:
            scatter = folds.square_sum / self.rows - float(mean.pow(2).sum())
        variance = max(scatter, 0.0) / (folds.count - 1)
        distance = float(h.pow(2).sum()) - float(h.diagonal().sum()) ** 2 / h.shape[0]
        if distance <= 0.0:  # H is already a multiple of the identity
            return 0.0
        return min(1.0, variance / distance)

    def shrunk(self, *, centered: bool) -> tuple[torch.Tensor, float]:
        """`matrix(centered=...)` shrunk towards (tr H / F)·I by `shrinkage`, and ρ."""
        h = self.matrix(centered=centered)
        rho = self._intensity(h, centered)
        if rho == 0.0:
            return h, rho
        target = float(h.diagonal().mean())
        h = (1.0 - rho) * h
        h.diagonal().add_(rho * target)
        return h, rho


@dataclasses.dataclass
class FoldScatter:
    """The fold being read (its Σ x xᵀ, Σ x and rows) and, per fold already closed, its rows n_f
    and mean m_f, with Σ_f n_f ‖M_f‖²_F and Σ_f n_f ‖M_f − m_f m_fᵀ‖²_F (`Hessian.shrinkage`)."""

    current: torch.Tensor  # (F, F) float64
    current_sum: torch.Tensor  # (F,) float64
    current_rows: int = 0
    fold: int = -1
    rows: list[int] = dataclasses.field(default_factory=list)
    means: list[torch.Tensor] = dataclasses.field(default_factory=list)
    square_sum: float = 0.0
    centered_square_sum: float = 0.0

    @property
    def count(self) -> int:
        return len(self.rows)

    def add(self, fold: int, rows: torch.Tensor, into: Hessian) -> None:
        if fold != self.fold:
            self.close(into)
            self.fold = fold
        self.current += rows.T @ rows
        self.current_sum += rows.sum(0)
        self.current_rows += rows.shape[0]

    def close(self, into: Hessian) -> None:
        n = self.current_rows
        if not n:
            return
        into.gram += self.current
        mean = self.current_sum / n
        # ‖M‖² and ‖M − m mᵀ‖² = ‖M‖² − 2 mᵀ M m + ‖m‖⁴ of M = S / n, with no F×F temporary
        square = float(torch.linalg.vector_norm(self.current)) ** 2 / n**2
        centered = square - 2.0 * float(mean @ self.current @ mean) / n + float(mean @ mean) ** 2
        self.square_sum += n * square
        self.centered_square_sum += n * centered
        self.rows.append(n)
        self.means.append(mean.clone())
        self.current.zero_()
        self.current_sum.zero_()
        self.current_rows = 0


def fold_ids(groups: Sequence[Hashable] | None, count: int) -> torch.Tensor:
    """Each of `count` calibration images' fold for `capture_hessians(..., folds=)`: images with
    one group (the photo they were cut from) share a fold; more than MAX_FOLDS groups (e.g. every
    image its own, `groups` None) are merged, in order of first appearance, into MAX_FOLDS."""
    if groups is None:
        groups = range(count)
    if len(groups) != count:
        raise ValueError(f"{len(groups)} calibration groups for {count} images")
    index: dict[Hashable, int] = {}
    ids = torch.tensor([index.setdefault(g, len(index)) for g in groups], dtype=torch.long)
    if len(index) > MAX_FOLDS:
        ids = ids * MAX_FOLDS // len(index)
    return ids


@dataclasses.dataclass
class LogitWeighted:
    """Σ_t a_t x_t x_tᵀ, Σ_t a_t x_t, Σ_t a_t with a_t = ‖∂CE(z, y)/∂o_t‖² (cast.py's weight)."""

    gram: torch.Tensor
    sum_x: torch.Tensor
    weight: float = 0.0


def _moment(gram: torch.Tensor, sum_x: torch.Tensor, total: float, centered: bool) -> torch.Tensor:
    h = gram / total
    if centered:
        mean = sum_x / total
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
    logit_weighted: bool = False,
    folds: torch.Tensor | None = None,
) -> dict[str, Hessian]:
    """The input Gram matrix of each named layer over `images` (dense pass), in group order.

    `logit_weighted`: also the Gram matrix with each row weighted by its output-gradient energy
    (one forward + backward per batch, labels sampled from the model's softmax with `seed`).
    `folds` (one id per image, `fold_ids`): also the between-fold scatter `Hessian.shrinkage`
    needs (one more F×F buffer per layer, outside the HESSIAN_BYTES count); the images are read
    fold by fold (a stable sort), so which rows are sampled differs from a capture without
    folds. Not with `logit_weighted`.
    Layers are captured in as many passes as keep ≤ HESSIAN_BYTES of Gram matrices alive; a layer
    whose forward never runs as a module is absent from the result.
    """
    names = list(layer_names)
    if folds is not None:
        if logit_weighted:
            raise ValueError("folds are not kept for the logit-weighted moments")
        if folds.shape != (images.shape[0],):
            raise ValueError(f"{tuple(folds.shape)} fold ids for {images.shape[0]} images")
        order = torch.argsort(folds, stable=True)
        images, folds = images[order], folds[order]
    # the fold buffer (obs_shrink) is not counted: one F×F more per layer in memory (a pass holds
    # up to 2·HESSIAN_BYTES) rather than one pass more (counted: ViT-B/16 capture 68 → 109 s)
    per_feature2 = 16 if logit_weighted else 8
    steps, step, size = [], [], 0
    for name in names:
        features = _features(model.get_submodule(name))
        if step and size + per_feature2 * features**2 > HESSIAN_BYTES:
            steps.append(step)
            step, size = [], 0
        step.append(name)
        size += per_feature2 * features**2
    if step:
        steps.append(step)
    hessians: dict[str, Hessian] = {}
    for step in steps:
        hessians.update(
            _capture(model, step, images, names, max_rows, seed, batch_size, logit_weighted, folds)
        )
    return hessians


def _capture(
    model, step, images, names, max_rows, seed, batch_size, logit_weighted, folds
) -> dict[str, Hessian]:
    quotas = {name: _RowQuota(images.shape[0], max_rows, seed + names.index(name)) for name in step}
    found: dict[str, Hessian] = {}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def pre(module, args):
            x = args[0].detach()
            chosen, rows = sample_rows(module, x, quotas[name], ordered=folds is not None)
            rows = rows.reshape(rows.shape[0], -1)  # (rows, px·Cin), pixel-major: the group order
            record = found.get(name)
            if record is None:
                features = rows.shape[1]
                zeros = functools.partial(torch.zeros, dtype=torch.float64)
                record = found[name] = Hessian(zeros(features, features), zeros(features))
                if logit_weighted:
                    record.logit = LogitWeighted(zeros(features, features), zeros(features))
                if folds is not None:
                    record.folds = FoldScatter(zeros(features, features), zeros(features))
            if record.folds is None:
                record.gram += rows.T @ rows
            else:
                _add_by_fold(record, module, x, chosen, rows, batch_folds)
            record.sum_x += rows.sum(0)
            record.rows += rows.shape[0]
            if logit_weighted:
                pending[name] = (chosen, rows)

        return pre

    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def post(name: str):
        def hook(module, args, output):
            chosen, rows = pending.pop(name)

            def on_grad(grad):
                g = grad.detach()
                g = g.permute(0, 2, 3, 1) if g.ndim == 4 else g  # conv: positions × channels
                a = g.reshape(-1, g.shape[-1])[chosen].double().pow(2).sum(1)  # (rows,)
                record = found[name].logit
                record.gram += (rows * a[:, None]).T @ rows
                record.sum_x += a @ rows
                record.weight += float(a.sum())

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in step]
    if logit_weighted:
        handles += [model.get_submodule(name).register_forward_hook(post(name)) for name in step]
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            batch_folds = None if folds is None else folds[i : i + batch_size]
            if not logit_weighted:
                with torch.inference_mode():
                    model(batch)
                continue
            with torch.enable_grad():
                batch = batch.clone().requires_grad_(True)
                z = model(batch)
                probs = torch.softmax(z.detach().double(), 1)
                labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                loss = F.cross_entropy(z, labels, reduction="sum")
                torch.autograd.grad(loss, batch)  # fires the hooks; no parameter .grad written
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():  # the buffers were made in the capture's inference mode
        for record in found.values():
            if record.folds is not None:
                record.folds.close(record)
    return found


def _add_by_fold(record: Hessian, module, x, chosen, rows, batch_folds) -> None:
    """Add a batch's sampled `rows` (in batch order, `sample_rows(..., ordered=True)`) to its
    folds' Gram matrices, fold by fold (the batch's images are sorted by fold)."""
    if not len(chosen):
        return
    fold = batch_folds[chosen // (batch_rows(module, x) // x.shape[0])]
    values, counts = torch.unique_consecutive(fold, return_counts=True)
    for f, part in zip(values.tolist(), rows.split(counts.tolist()), strict=True):
        record.folds.add(f, part, into=record)


@dataclasses.dataclass(frozen=True)
class ObsProjection:
    mask: torch.Tensor  # bool, the weight's shape
    weight: torch.Tensor  # the OBS-updated weight (zeros where the mask is False)
    dropped_energy: float  # Σ over rows of the OBS cost (output error on the moment H)
    total_energy: float  # Σ over rows of wᵀ H w
    shrinkage: float | None = None  # obs_shrink: ρ of H's shrinkage towards (tr H / F)·I

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
    shrinkage: float | None = None,
) -> ObsProjection:
    """The k:n mask of `weight` in TensorRT's layout chosen group by group by the OBS cost.

    `hessian` (F, F) is the input second moment in group order (`capture_hessians`) over `rows`
    calibration rows (fewer rows than live columns: H = I, magnitude); `shrinkage` (the ρ that
    shrank it, `Hessian.shrunk`) is only recorded. Exact over
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
    dropped = torch.zeros((), dtype=torch.float64)
    block = max(n, (BLOCK_COLUMNS // n) * n)
    rows = torch.arange(out)
    # everything that depends on U only, for all groups at once: the group's block B of the
    # inverse (n, n), the inverse of B_DD for every pattern, and U_g[:, D] (n, d) per pattern
    groups = features // n
    u_diag = U.reshape(groups, n, groups, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    bmats = u_diag.transpose(1, 2) @ u_diag  # (G, n, n)
    invs = torch.linalg.inv(bmats[:, drop_idx.unsqueeze(2), drop_idx.unsqueeze(1)])  # (G, P, d, d)
    u_drop = u_diag[:, :, drop_idx].permute(0, 2, 1, 3)  # (G, P, n, d)
    for b0 in range(0, features, block):
        b1 = min(b0 + block, features)
        err = torch.zeros(out, b1 - b0, dtype=torch.float64)
        with _one_thread():  # many tiny ops: extra threads only add synchronisation
            for j in range(b0, b1, n):
                g = j // n
                wg = W[:, j : j + n]
                wd = wg[:, drop_idx]  # (out, P, d)
                q = torch.einsum("opi,pij->opj", wd, invs[g])  # [B_DD]⁻¹ w_D per pattern
                best_cost, best = (q * wd).sum(-1).min(dim=1)
                coeff = q[rows, best]  # (out, d)
                u_chosen = u_drop[g][best]  # (out, n, d)
                kept = patterns[best]  # (out, n)
                if sampled:
                    chosen_d, chosen_inv, cost = _prefer_saliency(
                        wg, bmats[g], k, drop_idx[best], invs[g][best], best_cost
                    )
                    better = cost < best_cost
                    if bool(better.any()):
                        ug = u_diag[g]
                        coeff = torch.einsum("oij,oj->oi", chosen_inv, wg[rows[:, None], chosen_d])
                        u_chosen = ug[:, chosen_d].permute(1, 0, 2)
                        kept = torch.ones(out, n, dtype=torch.bool)
                        kept[rows[:, None], chosen_d] = False
                        best_cost = cost
                e = (u_chosen @ coeff.unsqueeze(2)).squeeze(2)  # (out, n)
                W[:, j:b1] -= e @ U[j : j + n, j:b1]
                W[:, j : j + n] *= kept
                keep[:, j : j + n] = kept
                err[:, j - b0 : j - b0 + n] = e
                dropped += best_cost.sum()
        if b1 < features:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    new_weight = ungrouped(W.reshape(w.shape), shape).to(weight.dtype)
    mask = ungrouped(keep.reshape(w.shape), shape)
    return ObsProjection(mask, new_weight * mask, float(dropped), total, shrinkage)


@contextlib.contextmanager
def _one_thread():
    """torch on one thread for the per-group loop, restored after: its ops are (out × n)-sized,
    and on a loaded 2-core machine two threads cost 20× the CPU time of one (docs/sparsity.md)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


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
