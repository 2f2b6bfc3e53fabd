"""Which AWQ scales minimise the output error of a weight that reads one input.

For alpha = i / n_grid: s = E[x^2]^alpha (clamped at 1e-5; "activation" scaling) or
s = E|x|^alpha / mean|W^|^(1 - alpha) ("duo", llm-compressor's default), W_hat = Q(W * s) / s, and
the error is what the caller measures on W_hat. The search tries a list of candidate scales and
keeps the first with the least error, whichever form they come from. For one linear (or several
reading the same input, stacked by rows) it is mean((X (W - W_hat)^T)^2): that equals the MSE of
X W^T + b against X W_hat^T + b exactly, since the bias cancels, and one product per alpha avoids
subtracting two large outputs. X is a seeded sample of the calibration tokens, or every token
through the input's second moment (``GramOutputError``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from awqkit.config import SCALINGS
from awqkit.errors import NonFiniteError
from awqkit.quant.grid import (
    GroupQuantized,
    as_groups,
    dequantize_groupwise,
    from_groups,
    quantize_groupwise,
    round_nearest,
)
from awqkit.quant.rounding import RoundingFactory
from awqkit.quant.rows import ALL_ROWS, ROW_CHUNK, RowShare, gather_quantized


def awq_scales(salience: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = salience^alpha, clamped so a dead channel gets 1e-5 rather than 0 (no additive bias).

    Not normalised here: the search's choice does not depend on a constant factor, and what
    constant keeps folded weights representable depends on where s folds (folding.fold_normalizer).
    """
    return salience.pow(alpha).clamp(min=1e-5)


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


# W_hat -> the error it causes; the search minimises it.
ErrorFn = Callable[[torch.Tensor], float]


@runtime_checkable
class SummedError(Protocol):
    """An error that is a mean over parts (a linear's row chunks, a module's input windows), each
    part's sum of squares taken in float64: processes that split the parts add their sums, in part
    order, to the one-process bits."""

    n_parts: int

    def local_sums(self, w_hat: torch.Tensor, rows: RowShare) -> torch.Tensor:
        """The float64 sums of this process's parts; ``w_hat`` holds its ``rows`` of W_hat."""
        ...

    def mean(self, sums: torch.Tensor) -> float:
        """The error from every part's sum, in part order."""
        ...

    def __call__(self, w_hat: torch.Tensor) -> float:
        """The error of a whole W_hat, measured by one process."""
        ...


class LinearOutputError:
    """mean((X (W - W_hat)^T)^2), the output MSE of the linear(s) with weight ``w`` on input
    tokens ``x`` [n, in]: it equals the MSE of X W^T + b against X W_hat^T + b exactly, since the
    bias cancels, and one product avoids subtracting two large outputs.

    The squares are summed in float64 per chunk of ``ROW_CHUNK`` rows (the product in the dtype
    of ``x``, bf16 where that is faster): the parts of a ``SummedError``, so a process needs only
    its own rows of W_hat.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        self.x, self.w = x, w
        self.n_parts = -(-w.shape[0] // ROW_CHUNK)

    def chunk_sums(self, w_hat: torch.Tensor, rows: slice) -> torch.Tensor:
        """The float64 sums of squares of each chunk of ``rows`` (``w_hat`` holds those rows)."""
        d = (self.w[rows] - w_hat).to(self.x.dtype)
        sums = [
            torch.nn.functional.linear(self.x, d[i : i + ROW_CHUNK]).to(torch.float64).square().sum()
            for i in range(0, d.shape[0], ROW_CHUNK)
        ]
        return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=self.x.device)  # no rows here

    def local_sums(self, w_hat: torch.Tensor, rows: RowShare) -> torch.Tensor:
        return self.chunk_sums(w_hat, rows.part(self.w.shape[0]))

    def mean(self, sums: torch.Tensor) -> float:
        return (sums.sum() / (self.x.shape[0] * self.w.shape[0])).item()

    def __call__(self, w_hat: torch.Tensor) -> float:
        return self.mean(self.chunk_sums(w_hat, slice(0, self.w.shape[0])))


def linear_output_error(x: torch.Tensor, w: torch.Tensor) -> LinearOutputError:
    """The output MSE of the linear(s) with weight ``w`` on input tokens ``x`` [n, in]."""
    return LinearOutputError(x, w)


class GramOutputError(LinearOutputError):
    """The same mean((X (W - W_hat)^T)^2), over every calibration token, from the input's second
    moment M = E[x x^T] = G / n: tr(dW M dW^T) / out. One product of out x in x in per W_hat
    instead of tokens x in x out, and no token sample. Summed per ``ROW_CHUNK`` rows in float64
    like the token form (the product in float32)."""

    def __init__(self, second_moment: torch.Tensor, w: torch.Tensor):
        self.m, self.w = second_moment.float(), w
        self.n_parts = -(-w.shape[0] // ROW_CHUNK)

    def chunk_sums(self, w_hat: torch.Tensor, rows: slice) -> torch.Tensor:
        d = (self.w[rows] - w_hat).float()
        sums = [(c @ self.m).mul_(c).to(torch.float64).sum() for c in d.split(ROW_CHUNK)]
        return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=self.m.device)

    def mean(self, sums: torch.Tensor) -> float:
        return (sums.sum() / self.w.shape[0]).item()


def gram_output_error(second_moment: torch.Tensor, w: torch.Tensor) -> GramOutputError:
    """The output MSE of the linear(s) with weight ``w`` over every token whose inputs have second
    moment ``second_moment`` [in, in]."""
    return GramOutputError(second_moment, w)


def whole_errors(error_of: ErrorFn, rows: RowShare, w_hats: Iterable[torch.Tensor], n_rows: int) -> list[float]:
    """The error of each whole W_hat when this process holds ``w_hats``, its ``rows`` of each.

    A ``SummedError``'s part sums are gathered once for all the W_hats (one exchange, not one per
    candidate: each is a point where every process waits for the slowest); any other error is
    measured on each W_hat gathered whole.
    """
    if isinstance(error_of, SummedError):
        sums = torch.stack([error_of.local_sums(w_hat, rows) for w_hat in w_hats], dim=1)  # [parts here, W_hats]
        every = rows.gather(sums, error_of.n_parts, unit=1).T.contiguous()  # one W_hat's sums per row
        return [error_of.mean(part_sums) for part_sums in every]
    return [error_of(rows.gather(w_hat, n_rows)) for w_hat in w_hats]


def whole_error(error_of: ErrorFn, rows: RowShare, w_hat: torch.Tensor, n_rows: int) -> float:
    """``whole_errors`` of one W_hat."""
    return whole_errors(error_of, rows, [w_hat], n_rows)[0]


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
    fallback: str | None = None  # why the rounding asked for was not the one applied

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
    W_hat (``whole_errors``), so every process keeps the same candidate.
    """
    rounding = rounding or (lambda scales: round_nearest)
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("the weight holds NaN or infinite values")
    n_rows = w.shape[0]
    mine = w[rows.part(n_rows)]
    scales = [candidate.scales.to(w.dtype) for candidate in candidates]
    if not all(bool(torch.isfinite(s).all()) for s in scales):
        raise NonFiniteError("the input statistics hold NaN or infinite values (the forward pass overflowed?)")

    def quantized_at(s: torch.Tensor) -> GroupQuantized:
        return quantize_groupwise(mine * s, bits, group_size, rounding(s), symmetric=symmetric)

    w_hats = (dequantize_groupwise(quantized_at(s)).div_(s) for s in scales)
    errors = whole_errors(error_of, rows, w_hats, n_rows)
    for candidate, error in zip(candidates, errors):
        if not math.isfinite(error):
            raise NonFiniteError(f"the output error at {candidate.scaling} alpha {candidate.alpha:g} is {error}")
    best = errors.index(min(errors))  # the first of the least
    # Quantized again rather than every candidate's integers held: one more rounding of one weight.
    quantized = gather_quantized(rows, quantized_at(scales[best]), n_rows)
    chosen = candidates[best]
    return SearchResult(chosen.alpha, scales[best], quantized, errors[best], errors, chosen.scaling)


def round_again(
    w: torch.Tensor,
    result: SearchResult,
    error_of: ErrorFn,
    *,
    rounding: RoundingFactory,
    symmetric: bool = False,
    rows: RowShare = ALL_ROWS,
) -> SearchResult:
    """``result``'s grid (scales and clip) rounded by ``rounding`` instead, with its error: the
    rounding applied once after a search that chose with another."""
    n_rows = w.shape[0]
    part = rows.part(n_rows)
    q, s = result.quantized, result.scales
    clip = None if result.clip is None else result.clip[part]
    quantized = quantize_groupwise(w[part] * s, q.bits, q.group_size, rounding(s), symmetric=symmetric, clip=clip)
    error = whole_error(error_of, rows, dequantize_groupwise(quantized).div_(s), n_rows)
    if not math.isfinite(error):
        raise NonFiniteError(f"the output error after rounding is {error}")
    return replace(result, quantized=gather_quantized(rows, quantized, n_rows), error=error)


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
    return search_scales(
        w, candidates, error_of, bits=bits, group_size=group_size, rounding=rounding, symmetric=symmetric
    )
