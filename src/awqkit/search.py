"""Which AWQ scales minimise the output error of a weight that reads one input.

For alpha = i / n_grid: s = E[x^2]^alpha (clamped at 1e-5; "activation" scaling) or
s = E|x|^alpha / mean|W^|^(1 - alpha) ("duo", llm-compressor's default), W_hat = Q(W * s) / s, and
the error is what the caller measures on W_hat. The search tries a list of candidate scales and
keeps the first with the least error, whichever form they come from. For one linear (or several reading the same input, stacked by
rows) it is mean((X (W - W_hat)^T)^2): that equals the MSE of X W^T + b against X W_hat^T + b
exactly, since the bias cancels, and one product per alpha avoids subtracting two large outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from awqkit.quant import GroupQuantized, as_groups, from_groups, dequantize_groupwise, quantize_groupwise, round_nearest
from awqkit.rounding import RoundingFactory
from awqkit.shares import ALL_ROWS, ROW_CHUNK, RowShare, gather_quantized


def awq_scales(salience: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = salience^alpha, clamped so a dead channel gets 1e-5 rather than 0 (no additive bias).

    Not normalised here: the search's choice does not depend on a constant factor, and what
    constant keeps folded weights representable depends on where s folds (folding.fold_normalizer).
    """
    return salience.pow(alpha).clamp(min=1e-5)


SCALINGS = ("activation", "duo", "both")


def weight_abs_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input channel, the mean over rows of |w| / max|w| of its group: the weight side of duo.

    Dividing by the group's max makes every group count alike, as llm-compressor does; an all-zero
    group counts 0.
    """
    grouped = as_groups(w.abs(), group_size)
    normalized = grouped / grouped.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return from_groups(normalized, w.shape[1]).mean(dim=0)


def duo_scales(act_abs_mean: torch.Tensor, w_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = E|x|^alpha / mean|W^|^(1 - alpha), both floored at 1e-5 so a dead channel stays finite."""
    return (act_abs_mean.pow(alpha) / w_abs_mean.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


@dataclass(frozen=True)
class ScaleCandidate:
    scaling: str  # "activation" or "duo"
    alpha: float
    scales: torch.Tensor


def scale_candidates(
    scaling: str,
    alphas: Sequence[float],
    salience: torch.Tensor,
    act_abs_mean: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    group_size: int = 128,
) -> list[ScaleCandidate]:
    """The scales the search tries: activation ones, duo ones, or both (activation first)."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
    candidates = []
    if scaling in ("activation", "both"):
        candidates += [ScaleCandidate("activation", a, awq_scales(salience, a)) for a in alphas]
    if scaling in ("duo", "both"):
        if act_abs_mean is None or w is None:
            raise ValueError("duo scaling needs E|x| and the weight")
        w_mean = weight_abs_mean(w, group_size).to(act_abs_mean.dtype)
        candidates += [ScaleCandidate("duo", a, duo_scales(act_abs_mean, w_mean, a)) for a in alphas]
    return candidates


class NonFiniteError(ValueError):
    """A weight, a statistic or an error that is NaN or infinite: never silently searched past."""


# W_hat -> the error it causes; the search minimises it.
ErrorFn = Callable[[torch.Tensor], float]


class LinearOutputError:
    """mean((X (W - W_hat)^T)^2), the output MSE of the linear(s) with weight ``w`` on input
    tokens ``x`` [n, in]: it equals the MSE of X W^T + b against X W_hat^T + b exactly, since the
    bias cancels, and one product avoids subtracting two large outputs.

    The squares are summed in float64 per chunk of ``ROW_CHUNK`` rows (the product in the dtype
    of ``x``, bf16 where that is faster) and the chunk sums added in row order: workers that each
    hold whole chunks of rows compute their chunks' sums, and the sums add to the one-worker bits.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        self.x, self.w = x, w

    def chunk_sums(self, w_hat: torch.Tensor, rows: slice) -> torch.Tensor:
        """The float64 sums of squares of each chunk of ``rows`` (``w_hat`` holds those rows)."""
        d = (self.w[rows] - w_hat).to(self.x.dtype)
        sums = [
            torch.nn.functional.linear(self.x, d[i : i + ROW_CHUNK]).to(torch.float64).square().sum()
            for i in range(0, d.shape[0], ROW_CHUNK)
        ]
        return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=self.x.device)  # no rows here

    def mean(self, chunk_sums: torch.Tensor) -> float:
        """The MSE from every chunk's sum, in row order."""
        return (chunk_sums.sum() / (self.x.shape[0] * self.w.shape[0])).item()

    def __call__(self, w_hat: torch.Tensor) -> float:
        return self.mean(self.chunk_sums(w_hat, slice(0, self.w.shape[0])))


def linear_output_error(x: torch.Tensor, w: torch.Tensor) -> LinearOutputError:
    """The output MSE of the linear(s) with weight ``w`` on input tokens ``x`` [n, in]."""
    return LinearOutputError(x, w)


def whole_error(error_of: ErrorFn, rows: RowShare, w_hat: torch.Tensor, n_rows: int) -> float:
    """The error of the whole W_hat when this process holds ``w_hat``, its ``rows``: a linear's
    from every process's chunk sums, any other error measured on the gathered W_hat."""
    if isinstance(error_of, LinearOutputError):
        part = rows.part(n_rows)
        return error_of.mean(rows.gather(error_of.chunk_sums(w_hat, part), -(-n_rows // ROW_CHUNK), unit=1))
    return error_of(rows.gather(w_hat, n_rows))


def alpha_grid(n_grid: int) -> list[float]:
    """alpha = i / n_grid for i = 0..n_grid; n_grid = 0 is alpha 0 alone: s = 1, no search (RTN)."""
    if n_grid < 0:
        raise ValueError(f"n-grid must be >= 0, got {n_grid}")
    return [i / n_grid for i in range(n_grid + 1)] if n_grid else [0.0]


@dataclass(frozen=True)
class SearchResult:
    alpha: float
    scales: torch.Tensor
    quantized: GroupQuantized  # of W * scales
    error: float
    errors: list[float]  # one per candidate tried, in order
    scaling: str = "activation"
    clip: torch.Tensor | None = None  # per-group range ratios [out, n_groups] when clipped

    def dequantized(self) -> torch.Tensor:
        """The weight to store in float: Q(W * s) / s."""
        return dequantize_groupwise(self.quantized) / self.scales

    def divided(self, c: float) -> SearchResult:
        """The same choice for s / c: the integers of W * s / c are those of W * s, group scales / c."""
        return replace(self, scales=self.scales / c, quantized=replace(self.quantized, scale=self.quantized.scale / c))


def search_scales(
    w: torch.Tensor,
    candidates: Sequence[ScaleCandidate],
    error_of: ErrorFn,
    *,
    bits: int,
    group_size: int,
    rounding: RoundingFactory | None = None,
    symmetric: bool = False,
    rows: RowShare = ALL_ROWS,
) -> SearchResult:
    """Quantize ``w`` [out, in] at each candidate's scales and keep the first with the least error.

    This process quantizes only its ``rows``, and every candidate's error is that of the whole
    W_hat (``whole_error``), so every process keeps the same candidate.
    """
    rounding = rounding or (lambda scales: round_nearest)
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("the weight holds NaN or infinite values")
    n_rows = w.shape[0]
    mine = w[rows.part(n_rows)]
    best: SearchResult | None = None
    errors: list[float] = []
    for candidate in candidates:
        scales = candidate.scales.to(w.dtype)
        if not bool(torch.isfinite(scales).all()):
            raise NonFiniteError("the input statistics hold NaN or infinite values (the forward pass overflowed?)")
        quantized = quantize_groupwise(mine * scales, bits, group_size, rounding(scales), symmetric=symmetric)
        error = whole_error(error_of, rows, dequantize_groupwise(quantized).div_(scales), n_rows)
        if not math.isfinite(error):
            raise NonFiniteError(f"the output error at {candidate.scaling} alpha {candidate.alpha:g} is {error}")
        errors.append(error)
        if best is None or error < best.error:
            best = SearchResult(candidate.alpha, scales, quantized, error, errors, candidate.scaling)
    assert best is not None
    return replace(best, errors=errors, quantized=gather_quantized(rows, best.quantized, n_rows))


def search_alpha(
    w: torch.Tensor,
    salience: torch.Tensor,
    error_of: ErrorFn,
    *,
    bits: int,
    group_size: int,
    alphas: Sequence[float],
    rounding: RoundingFactory | None = None,
    symmetric: bool = False,
) -> SearchResult:
    """``search_scales`` over activation scales E[x^2]^alpha: the first alpha with the smallest error
    wins, so ties go to the weaker scaling; ``alphas=[0.0]`` is plain round-to-nearest (s = 1)."""
    if not bool(torch.isfinite(salience).all()):
        raise NonFiniteError("the input statistics hold NaN or infinite values (the forward pass overflowed?)")
    candidates = scale_candidates("activation", alphas, salience)
    return search_scales(w, candidates, error_of, bits=bits, group_size=group_size, rounding=rounding, symmetric=symmetric)
