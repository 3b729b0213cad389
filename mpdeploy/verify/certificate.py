"""The margin certificate: predictions whose dense top-1 margin exceeds twice the logit perturbation
provably keep their label (docs/pruning.md; the "dense margin > 2 × perturbation" corollary)."""

from __future__ import annotations

import numpy as np


def top1_margin(logits: np.ndarray) -> np.ndarray:
    """Per-sample gap between the largest and second-largest logit."""
    if logits.shape[1] < 2:
        return np.full(logits.shape[0], np.inf)
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def margin_certificate(reference: np.ndarray, perturbed: np.ndarray) -> dict[str, float | int]:
    """Compare per-sample ‖Δlogits‖∞ with half the reference top-1 margin.

    If ‖Δ‖∞ < margin/2 the arg-max cannot move, so `certified_fraction` is a lower bound on the
    fraction of unchanged predictions, and `top1_agreement` is what actually happened.
    """
    reference = np.asarray(reference, dtype=np.float64).reshape(reference.shape[0], -1)
    perturbed = np.asarray(perturbed, dtype=np.float64).reshape(perturbed.shape[0], -1)
    delta = np.abs(reference - perturbed).max(axis=1)
    margin = top1_margin(reference)
    certified = margin > 2.0 * delta
    agree = reference.argmax(axis=1) == perturbed.argmax(axis=1)
    return {
        "samples": int(reference.shape[0]),
        "certified_fraction": float(certified.mean()),
        "top1_agreement": float(agree.mean()),
        "max_logit_perturbation": float(delta.max()),
        "median_logit_perturbation": float(np.median(delta)),
        "median_top1_margin": float(np.median(margin)),
    }
