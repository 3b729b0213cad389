"""Marchenko–Pastur and Tracy–Widom (β=1) distribution functions used by the spectral fit."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mpdeploy.errors import UserError


def mp_edges(gamma: float, sigma_sq: float = 1.0) -> tuple[float, float]:
    """Support [λ−, λ+] of MP(γ, σ²) for γ = p/n ≤ 1."""
    root = np.sqrt(gamma)
    return sigma_sq * (1.0 - root) ** 2, sigma_sq * (1.0 + root) ** 2


def mp_density(x, gamma: float, sigma_sq: float = 1.0) -> np.ndarray:
    """MP(γ, σ²) density for γ ≤ 1 (no atom at zero), zero outside the support."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = mp_edges(gamma, sigma_sq)
    inside = (x > lo) & (x < hi)
    safe = np.where(inside, x, 1.0)
    dens = np.sqrt(np.clip((hi - safe) * (safe - lo), 0.0, None)) / (
        2.0 * np.pi * gamma * sigma_sq * safe
    )
    return np.where(inside, dens, 0.0)


def _cdf_of_angle(theta: np.ndarray, gamma: float) -> np.ndarray:
    # Closed form of ∫ density after x = (1+γ) − 2√γ·cos θ; arctan2 keeps γ = 1 finite.
    root = np.sqrt(gamma)
    half = theta / 2.0
    arc = np.arctan2((1.0 + root) * np.sin(half), (1.0 - root) * np.cos(half))
    return (2.0 / np.pi) * (
        np.sin(theta) / (2.0 * root)
        + (1.0 + gamma) * theta / (4.0 * gamma)
        - (1.0 - gamma) / (2.0 * gamma) * arc
    )


def mp_cdf(x, gamma: float, sigma_sq: float = 1.0) -> np.ndarray:
    """CDF of MP(γ, σ²) for 0 < γ ≤ 1, exact (closed form), vectorised over x."""
    x = np.asarray(x, dtype=np.float64) / sigma_sq
    root = np.sqrt(gamma)
    cos_theta = np.clip(((1.0 + gamma) - x) / (2.0 * root), -1.0, 1.0)
    return np.clip(_cdf_of_angle(np.arccos(cos_theta), gamma), 0.0, 1.0)


def mp_quantile(u, gamma: float) -> np.ndarray:
    """Lower quantiles of unit-variance MP(γ), 0 < γ ≤ 1, by vectorised bisection on the angle.

    The CDF is monotone in the angle θ ∈ [0, π], so 55 halvings reach double precision.
    """
    u = np.asarray(u, dtype=np.float64)
    lo = np.zeros_like(u)
    hi = np.full_like(u, np.pi)
    for _ in range(55):
        mid = 0.5 * (lo + hi)
        below = _cdf_of_angle(mid, gamma) < u
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    theta = 0.5 * (lo + hi)
    return (1.0 + gamma) - 2.0 * np.sqrt(gamma) * np.cos(theta)


def tw1_cdf(s: float, nodes: int = 32, length: float = 16.0) -> float:
    """Tracy–Widom GOE (TW₁) CDF, computed rather than tabulated.

    Ferrari & Spohn (2005): F₁(s) = det(I − B_s) on L²(0, ∞) with B_s(x, y) = Ai(x + y + s);
    evaluated by Bornemann's (2010, Math. Comp. 79) Gauss–Legendre Nyström method on [0, length]
    (Ai decays super-exponentially, so the truncation error is far below double precision).
    """
    from scipy.special import airy

    x, w = np.polynomial.legendre.leggauss(nodes)
    x = (x + 1.0) * (length / 2.0)
    sw = np.sqrt(w * (length / 2.0))
    kernel = airy(x[:, None] + x[None, :] + s)[0]
    return float(np.linalg.det(np.eye(nodes) - sw[:, None] * kernel * sw[None, :]))


@lru_cache(maxsize=64)
def tw1_quantile(prob: float) -> float:
    """Quantile of TW₁; e.g. 0.95 → 0.9793 and 0.2 → −2.2832 (Johnstone 2001, Table 1)."""
    from scipy.optimize import brentq

    if not 0.001 <= prob <= 0.999:
        raise UserError(f"Tracy–Widom quantile level must lie in [0.001, 0.999], got {prob}")
    return float(brentq(lambda s: tw1_cdf(s) - prob, -9.0, 7.0, xtol=1e-10))
