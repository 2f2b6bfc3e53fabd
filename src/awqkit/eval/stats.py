"""Statistics over per-window NLLs: perplexity, bootstrap intervals, paired differences.

Windows are the resampling unit: tokens within a window are correlated, windows far less so.
Pure functions, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def perplexity(window_nlls: torch.Tensor | np.ndarray, tokens: np.ndarray | None = None) -> float:
    """exp of the mean token NLL: windows weighted by the tokens they predict (equal when omitted)."""
    nll = np.asarray(window_nlls, dtype=np.float64)
    return math.exp(weighted_mean(nll, np.ones_like(nll) if tokens is None else tokens))


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sum(values * weights) / np.sum(weights))


def bootstrap_means(values: np.ndarray, weights: np.ndarray, n_resamples: int = 2000, seed: int = 42) -> np.ndarray:
    """Weighted means of ``n_resamples`` resamples of the windows, drawn with replacement."""
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_resamples)
    per_block = max(1, 2**22 // n)  # bounds the index matrix to ~32 MB
    for start in range(0, n_resamples, per_block):
        idx = rng.integers(0, n, size=(min(per_block, n_resamples - start), n))
        w = weights[idx]
        means[start : start + len(idx)] = np.sum(values[idx] * w, axis=1) / np.sum(w, axis=1)
    return means


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def win_share(nll: np.ndarray, reference: np.ndarray) -> float:
    """Share of windows where ``nll`` is lower than ``reference``; ties count half."""
    nll, reference = np.asarray(nll), np.asarray(reference)
    return float((np.sum(nll < reference) + 0.5 * np.sum(nll == reference)) / len(nll))


@dataclass(frozen=True)
class PairedDifference:
    """Model minus reference, over the same windows."""

    mean_nll_diff: float
    ci: tuple[float, float]
    win_share: float


def paired_difference(
    nll: np.ndarray, reference: np.ndarray, weights: np.ndarray, n_resamples: int = 2000, seed: int = 42
) -> PairedDifference:
    """Mean NLL difference with a paired bootstrap 95% CI: both models resampled on the same windows."""
    diff = np.asarray(nll, np.float64) - np.asarray(reference, np.float64)
    ci = percentile_interval(bootstrap_means(diff, weights, n_resamples, seed))
    return PairedDifference(weighted_mean(diff, weights), ci, win_share(nll, reference))


def perplexity_interval(
    nll: np.ndarray, weights: np.ndarray, n_resamples: int = 2000, seed: int = 42
) -> tuple[float, float]:
    """95% CI of perplexity: exp of the bootstrap interval of the mean NLL."""
    low, high = percentile_interval(bootstrap_means(nll, weights, n_resamples, seed))
    return math.exp(low), math.exp(high)
