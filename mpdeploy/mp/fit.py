"""BEMA fit of a Marchenko–Pastur bulk to one weight matrix, in the authors' code conventions.

W is (M = out, N = in); the gram on the smaller side is divided by N = in_features
(docs/spectrum.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from mpdeploy.errors import UserError
from mpdeploy.mp.distributions import mp_cdf, mp_quantile, tw1_quantile

TW_TERMS = ("code", "paper")
SMALL_GRAM = 384  # below this gram size the fit runs single-threaded
RELATIVE_ZERO = 1e-5  # central eigenvalues below this share of λ_max count as zero


@dataclass(frozen=True)
class MPFitSettings:
    """Knobs of the fit; defaults are the authors' (α = 0.25 window, β = 0.8 TW edge)."""

    alpha: float = 0.25
    beta: float = 0.8
    spike_quantile: float = 0.95
    hill_k: int = 20
    tw_term: str = "code"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise UserError(f"MP fit window alpha must lie in (0, 0.5), got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise UserError(f"MP edge beta must lie in (0, 1), got {self.beta}")
        if not 0.5 <= self.spike_quantile < 1.0:
            raise UserError(f"spike_quantile must lie in [0.5, 1), got {self.spike_quantile}")
        if self.hill_k < 1:
            raise UserError(f"hill_k must be at least 1, got {self.hill_k}")
        if self.tw_term not in TW_TERMS:
            raise UserError(f"tw_term must be one of {TW_TERMS}, got {self.tw_term!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MPFit:
    """MP fit of one matrix. Eigenvalues are those of the gram / in_features, singular values of W.

    bulk_fraction = share of the p eigenvalues at or below the detection edge (1 − spike_count/p);
    above_edge_count counts eigenvalues above the β edge λ+ (the authors' K_spike, noise included).
    """

    name: str | None
    rows: int  # M = out_features (Cout for a conv)
    cols: int  # N = in_features (Cin·kh·kw for a conv)
    gamma: float  # p / n
    sigma_sq: float  # BEMA scale σ̂² in gram units (the authors' variable)
    noise_variance: float  # implied per-entry variance of the random part
    lambda_plus: float  # β-edge with TW correction, eigenvalue units: the budget edge
    sigma_plus: float  # √(N·λ+), singular-value units
    lambda_detect: float  # detection edge at TW quantile spike_quantile, eigenvalue units
    sigma_detect: float
    spike_count: int
    spike_singular_values: tuple[float, ...]  # descending
    above_edge_count: int
    bulk_fraction: float
    spike_energy_fraction: float  # Σ spike s² / ‖W‖_F²
    fit_error: float  # max |F_emp − F_MP| over the central window
    hill_alpha: float | None  # None when the top of the spectrum is flat or rank-deficient
    sigma_max: float
    eigenvalues: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self, include_eigenvalues: bool = False) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eigenvalues"}
        out["spike_singular_values"] = list(self.spike_singular_values)
        if include_eigenvalues and self.eigenvalues is not None:
            out["eigenvalues"] = self.eigenvalues.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MPFit:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["spike_singular_values"] = tuple(kwargs.get("spike_singular_values", ()))
        if kwargs.get("eigenvalues") is not None:
            kwargs["eigenvalues"] = np.asarray(kwargs["eigenvalues"], dtype=np.float64)
        return cls(**kwargs)


def tw_edge_factor(gamma: float, n: int, t: float, tw_term: str) -> float:
    """Edge in units of σ̂²: (1+√γ)² + t·n^(−2/3)·γ^(−1/6)·term.

    The authors' code writes ``(1+sqrt(g))**4/3``, i.e. (1+√γ)⁴ divided by 3 ("code", which
    produced their numbers); the paper's algorithm box and Johnstone's (2001) TW scaling use the
    exponent 4/3 ("paper").
    """
    if tw_term not in TW_TERMS:
        raise UserError(f"tw_term must be one of {TW_TERMS}, got {tw_term!r}")
    root = math.sqrt(gamma)
    term = (1.0 + root) ** 4 / 3.0 if tw_term == "code" else (1.0 + root) ** (4.0 / 3.0)
    return (1.0 + root) ** 2 + t * n ** (-2.0 / 3.0) * gamma ** (-1.0 / 6.0) * term


@lru_cache(maxsize=256)
def _window_quantiles(p: int, n: int, alpha: float) -> tuple[int, np.ndarray]:
    start, stop = math.floor(alpha * p), math.floor((1.0 - alpha) * p)
    q = mp_quantile(np.arange(start, stop) / p, p / n)
    q.setflags(write=False)
    return start, q


def _label(name: str | None) -> str:
    return f"layer {name!r}" if name is not None else "matrix"


def as_matrix(weight: Any, name: str | None = None) -> torch.Tensor:
    """An (out, in) tensor; conv kernels (Cout, Cin, kh, kw) flatten to Cout × Cin·kh·kw.

    float64 input stays float64; anything else becomes float32, the precision weights carry.
    """
    mat = torch.as_tensor(weight).detach().cpu()
    mat = mat.double() if mat.dtype == torch.float64 else mat.float()
    if mat.ndim < 2:
        raise UserError(
            f"{_label(name)}: expected a matrix or conv kernel, got shape {tuple(mat.shape)}"
        )
    mat = mat.reshape(mat.shape[0], -1)
    if min(mat.shape) < 2:
        raise UserError(
            f"{_label(name)}: shape {mat.shape[0]}×{mat.shape[1]} has fewer than 2 singular values;"
            " an MP fit needs at least 2 rows and 2 columns"
        )
    return mat


def _gram(mat: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """The p×p gram on the smaller side, divided by in_features.

    The weight is validated through the gram's diagonal (its row or column sums of squares): every
    entry lands in one of them, so NaN/Inf or an all-zero weight show there, and scanning the p
    diagonal entries is far cheaper than scanning the whole weight.
    """
    rows, cols = mat.shape
    with _threads_for(min(rows, cols)):
        gram = mat @ mat.T if rows <= cols else mat.T @ mat
    diagonal = gram.diagonal()
    if not bool(torch.isfinite(diagonal).all()):
        raise UserError(f"{_label(name)}: weight contains NaN or Inf")
    if not bool(diagonal.any()):
        raise UserError(f"{_label(name)}: weight is all zeros, there is no spectrum to fit")
    return gram / cols


def _eigenvalues(grams: list[torch.Tensor]) -> list[np.ndarray]:
    """Ascending eigenvalues of same-size symmetric grams in one batched LAPACK call.

    Solved in the grams' own precision (float32 for real weights: twice as fast as float64, with
    eigenvalue errors ~1e-5 of λ_max, far below what the quantile fit resolves), returned as float64.
    """
    return [lam.astype(np.float64) for lam in torch.linalg.eigvalsh(torch.stack(grams)).numpy()]


def _parallel_eigenvalues(grams: list[torch.Tensor]) -> list[np.ndarray]:
    """`_eigenvalues` split over the available threads, each solve single-threaded.

    Threaded LAPACK is slower than one thread for grams of this size (measured: 16 grams of
    768² took 1.9 s on 2 threads, 0.4 s on 1), so the threads work on different matrices instead.
    The gram products before this keep all threads: matrix multiplication does scale.
    """
    workers = min(torch.get_num_threads(), len(grams))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            return _eigenvalues(grams)
        from concurrent.futures import ThreadPoolExecutor

        step = -(-len(grams) // workers)
        parts = [grams[i : i + step] for i in range(0, len(grams), step)]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # ATen releases the GIL
            return [lam for part in pool.map(_eigenvalues, parts) for lam in part]
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _threads_for(size: int) -> Iterator[None]:
    # Small problems gain nothing from threads, and on a busy machine OpenMP barriers make them
    # 100× slower in the tail; large grams keep the caller's thread count.
    threads = torch.get_num_threads()
    if size >= SMALL_GRAM or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_eigenvalues(
    eigenvalues: np.ndarray,
    rows: int,
    cols: int,
    name: str | None = None,
    settings: MPFitSettings = MPFitSettings(),
) -> MPFit:
    """Fit MP to the ascending eigenvalues of the gram of a rows×cols matrix (divided by cols)."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    p, n = min(rows, cols), max(rows, cols)
    gamma = p / n
    start, q = _window_quantiles(p, n, settings.alpha)
    window = lam[start : start + len(q)]
    denom = float(q @ q)
    if denom == 0.0:  # e.g. 2×2: the window holds only the 0 quantile of MP(1)
        raise UserError(f"{_label(name)}: a {rows}×{cols} matrix is too small for an MP fit")
    sigma_sq = float(q @ window) / denom
    # A float32 gram rounds at ~1e-7·λ_max, so a smaller bulk cannot be told apart from zero.
    if not sigma_sq > RELATIVE_ZERO * lam[-1]:
        rank = int((lam > RELATIVE_ZERO * lam[-1]).sum())
        raise UserError(
            f"{_label(name)}: the central eigenvalues are zero (numerical rank {rank} of {p}); "
            "an MP fit needs a noise bulk"
        )
    edge = tw_edge_factor(gamma, n, tw1_quantile(1.0 - settings.beta), settings.tw_term)
    if edge <= 0.0:
        raise UserError(
            f"{_label(name)}: a {rows}×{cols} matrix is too small for an MP fit "
            "(the Tracy–Widom correction exceeds the edge)"
        )
    lambda_plus = sigma_sq * edge
    # Detection is a test of "largest noise eigenvalue", so it uses Johnstone's exact TW scaling.
    detect = tw_edge_factor(gamma, n, tw1_quantile(settings.spike_quantile), "paper")
    lambda_detect = sigma_sq * detect
    spikes = lam[lam > lambda_detect][::-1]
    empirical = settings.alpha + (1.0 - 2.0 * settings.alpha) * np.arange(len(q)) / len(q)
    return MPFit(
        name=name,
        rows=rows,
        cols=cols,
        gamma=gamma,
        sigma_sq=sigma_sq,
        noise_variance=sigma_sq * (gamma if rows > cols else 1.0),
        lambda_plus=lambda_plus,
        sigma_plus=math.sqrt(cols * lambda_plus),
        lambda_detect=lambda_detect,
        sigma_detect=math.sqrt(cols * lambda_detect),
        spike_count=len(spikes),
        spike_singular_values=tuple(float(s) for s in np.sqrt(cols * spikes)),
        above_edge_count=int((lam > lambda_plus).sum()),
        bulk_fraction=1.0 - len(spikes) / p,
        spike_energy_fraction=float(spikes.sum() / lam.sum()),
        fit_error=float(np.abs(empirical - mp_cdf(window, gamma, sigma_sq)).max()),
        hill_alpha=_hill_alpha(lam, settings.hill_k),
        sigma_max=math.sqrt(cols * lam[-1]),
        eigenvalues=lam,
    )


def _hill_alpha(lam: np.ndarray, k: int) -> float | None:
    """Hill tail exponent 1 + 1/mean(log λ_i − log λ_(k+1)) over the top k eigenvalues."""
    k = min(k, len(lam) - 1)
    top = lam[::-1][: k + 1]
    if top[k] <= 0.0:
        return None
    spread = float(np.mean(np.log(top[:k]) - np.log(top[k])))
    return 1.0 + 1.0 / spread if spread > 0.0 else None


def fit_mp(
    weight: Any,
    name: str | None = None,
    *,
    alpha: float = 0.25,
    beta: float = 0.8,
    spike_quantile: float = 0.95,
    hill_k: int = 20,
    tw_term: str = "code",
) -> MPFit:
    """Fit the MP bulk of one weight matrix (numpy array or torch tensor, 2-D or conv 4-D)."""
    settings = MPFitSettings(alpha, beta, spike_quantile, hill_k, tw_term)
    mat = as_matrix(weight, name)
    (lam,) = _parallel_eigenvalues([_gram(mat, name)])
    return fit_eigenvalues(lam, *tuple(mat.shape), name=name, settings=settings)


def fit_many(
    weights: Mapping[str, Any],
    *,
    settings: MPFitSettings | None = None,
    batch_size: int = 16,
    **fit_kwargs: Any,
) -> dict[str, MPFit]:
    """Fit many matrices; grams of equal size share one batched eigensolver call.

    `fit_kwargs` are those of `fit_mp` (alpha, beta, ...) when no `settings` are given.
    """
    settings = settings or MPFitSettings(**fit_kwargs)
    # Shapes are validated up front; values (NaN/Inf, all zeros) through each gram's diagonal.
    mats = {name: as_matrix(weight, name) for name, weight in weights.items()}
    by_size: dict[int, list[str]] = {}
    for name, mat in mats.items():
        by_size.setdefault(min(mat.shape), []).append(name)
    fits: dict[str, MPFit] = {}
    for names in by_size.values():
        for i in range(0, len(names), batch_size):
            chunk = names[i : i + batch_size]
            grams = [_gram(mats[name], name) for name in chunk]
            for name, lam in zip(chunk, _parallel_eigenvalues(grams), strict=True):
                rows, cols = mats[name].shape
                fits[name] = fit_eigenvalues(lam, rows, cols, name=name, settings=settings)
    return {name: fits[name] for name in weights}
