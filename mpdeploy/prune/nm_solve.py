"""Least squares of every output row on its own N:M support at once, by conjugate gradients.

`compensate.py`'s `lsq` re-fit of an N:M layer solves, for each output row i with kept slots S_i,

    (A_{S_i S_i}) w_{S_i} = b_{S_i},    A = X̂ᵀX̂ (centred when the bias is free) + λI,

one linear system of |S_i| ≈ features·k/n unknowns per row. A Cholesky factorisation per row costs
out · (features·k/n)³ / 3 flops (a ViT-B/16 mlp.fc2: 768 rows × 1536³/3 ≈ 10¹² flops, float64),
and gathering each row's sub-Gram costs as much memory traffic again. Here every row runs its own
conjugate-gradient iteration on its own system, all rows together: the product of all search
directions with A is one (out × features) · (features × features) matrix product with the shared
Gram, masked back onto each row's support, so an iteration costs one dense layer's worth of
out · features² multiply-adds, in float32 (the Gram scaled to unit diagonal first: Jacobi
preconditioning, which also keeps float32 well scaled); scalars, the iterate and the residual are
kept in float64, and the residual is recomputed from the iterate every `REFRESH` steps so that
float32 round-off does not accumulate in it. CG minimises each row's objective ‖X̂w − y‖² + λ‖w‖²
over a growing Krylov space, so every iteration lowers the reconstruction error monotonically from
the warm start (the projected weights), and the exact solution is reached in the limit.

A free (unregularised) bias is eliminated exactly by centring: w solves the centred system, then
b = ȳ − x̄ᵀw.
"""

from __future__ import annotations

import dataclasses

import torch

MAX_ITERATIONS = 50
TOLERANCE = 1e-4  # every row stops at ‖r‖ ≤ TOLERANCE · ‖b_S‖ (float32 floor ≈ 1e-5)
REFRESH = 25  # recompute the residual from the iterate every REFRESH iterations


@dataclasses.dataclass(frozen=True)
class MaskedSolve:
    weight: torch.Tensor  # (out, features) float64, zero off the support
    bias: torch.Tensor  # (out,) float64 (zeros when the bias is not fitted)
    iterations: int
    residual: float  # max over rows of ‖r‖ / ‖b_S‖ at the end (scaled system)


def normal_equations(
    gram: torch.Tensor, cross: torch.Tensor, ridge: float, *, fit_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A (features, features), B (out, features), x̄, ȳ from the augmented sums [x̂, 1].

    `gram` = Σ x̃x̃ᵀ, `cross` = Σ x̃yᵀ with x̃ = [x̂, 1] (float64); λ = ridge × the mean diagonal of
    Σ x̂x̂ᵀ, on the weights only. With `fit_bias` the system is centred (x̄, ȳ returned)."""
    features = gram.shape[0] - 1
    a = gram[:features, :features].clone()
    b = cross[:features].T.clone()
    lam = ridge * float(a.diagonal().mean()) if features else 0.0
    mean_x = mean_y = None
    if fit_bias:
        rows = float(gram[features, features])
        mean_x = gram[:features, features] / rows
        mean_y = cross[features] / rows
        a -= rows * torch.outer(mean_x, mean_x)
        b -= rows * torch.outer(mean_y, mean_x)
    a.diagonal().add_(lam)
    return a, b, mean_x, mean_y


def solve_masked(
    gram: torch.Tensor,
    cross: torch.Tensor,
    support: torch.Tensor,
    ridge: float,
    *,
    fit_bias: bool = True,
    start: torch.Tensor | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> MaskedSolve:
    """Each row's ridge least squares on its own support (`support` (out, features) bool), by
    Jacobi-preconditioned CG on all rows at once, warm-started from `start` (masked)."""
    a, b, mean_x, mean_y = normal_equations(gram, cross, ridge, fit_bias=fit_bias)
    support = support.reshape(b.shape).bool()
    mask = support.double()
    scale = a.diagonal().clamp_min(1e-300).rsqrt()  # unit diagonal: Jacobi, and float32-friendly
    dead = a.diagonal() <= 0
    scaled = (a * scale[:, None] * scale[None, :]).float()
    rhs = b * scale * mask
    x = torch.zeros_like(rhs) if start is None else start.double() * mask / scale
    x[:, dead] = 0.0
    weight, iterations, residual = _cg(scaled, rhs, mask, x, max_iterations, tolerance)
    weight = weight * scale
    bias = torch.zeros(b.shape[0], dtype=torch.float64)
    if fit_bias:
        bias = mean_y - weight @ mean_x
    return MaskedSolve(weight, bias, iterations, residual)


def _cg(a32, rhs, mask, x, max_iterations, tolerance):
    """Independent CG per row of `x` on mask ⊙ (x a) = rhs; products with a in float32."""

    def apply(p):
        return (p.float() @ a32).double() * mask

    r = rhs - apply(x)
    target = tolerance * rhs.norm(dim=1)
    rr = (r * r).sum(1)
    p = r.clone()
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        q = apply(p)
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rr / pq.clamp_min(1e-300), torch.zeros_like(pq))
        x += alpha[:, None] * p
        if iterations % REFRESH == 0:
            r = rhs - apply(x)
        else:
            r -= alpha[:, None] * q
        rr_new = (r * r).sum(1)
        if bool((rr_new.sqrt() <= target).all()):
            rr = rr_new
            break
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr))
        p = r + beta[:, None] * p
        rr = rr_new
    ratio = rr.sqrt() / rhs.norm(dim=1).clamp_min(1e-300)
    return x, iterations, float(ratio.max()) if ratio.numel() else 0.0
