"""Which AWQ scales minimise the output error of a weight that reads one input.

For alpha = i / n_grid: s = E[x^2]^alpha (clamped at 1e-5), W_hat = Q(W * s) / s, and the error is
what the caller measures on W_hat. For one linear (or several reading the same input, stacked by
rows) it is mean((X (W - W_hat)^T)^2): that equals the MSE of X W^T + b against X W_hat^T + b
exactly, since the bias cancels, and one product per alpha avoids subtracting two large outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from awqkit.quant import GroupQuantized, dequantize_groupwise, quantize_groupwise, round_nearest
from awqkit.rounding import RoundingFactory


def awq_scales(salience: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = salience^alpha, clamped so a dead channel gets 1e-5 rather than 0 (no additive bias).

    Not normalised here: the search's choice does not depend on a constant factor, and what
    constant keeps folded weights representable depends on where s folds (folding.fold_normalizer).
    """
    return salience.pow(alpha).clamp(min=1e-5)


class NonFiniteError(ValueError):
    """A weight, a statistic or an error that is NaN or infinite: never silently searched past."""


def output_mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """mean((X (W - W_hat)^T)^2), the product in the dtype of ``x`` (bf16 where that is faster)."""
    y = torch.nn.functional.linear(x, (w - w_hat).to(x.dtype))
    return y.to(torch.promote_types(y.dtype, torch.float32)).pow(2).mean().item()


# W_hat -> the error it causes; the search minimises it.
ErrorFn = Callable[[torch.Tensor], float]


def linear_output_error(x: torch.Tensor, w: torch.Tensor) -> ErrorFn:
    """The output MSE of the linear(s) with weight ``w`` on input tokens ``x`` [n, in]."""
    return lambda w_hat: output_mse(x, w, w_hat)


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
    errors: list[float]  # one per alpha tried, in order

    def dequantized(self) -> torch.Tensor:
        """The weight to store in float: Q(W * s) / s."""
        return dequantize_groupwise(self.quantized) / self.scales

    def divided(self, c: float) -> SearchResult:
        """The same choice for s / c: the integers of W * s / c are those of W * s, group scales / c."""
        q = self.quantized
        divided = GroupQuantized(q.q, q.scale / c, q.zero, q.bits, q.group_size)
        return replace(self, scales=self.scales / c, quantized=divided)


def search_alpha(
    w: torch.Tensor,
    salience: torch.Tensor,
    error_of: ErrorFn,
    *,
    bits: int,
    group_size: int,
    alphas: Sequence[float],
    rounding: RoundingFactory | None = None,
) -> SearchResult:
    """Try each alpha for weight ``w`` [out, in] with input salience E[x^2] [in].

    The first alpha with the smallest error wins, so ties go to the weaker scaling.
    ``alphas=[0.0]`` gives s = 1: plain round-to-nearest (or greedy) with no scaling.
    """
    rounding = rounding or (lambda scales: round_nearest)
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("the weight holds NaN or infinite values")
    if not bool(torch.isfinite(salience).all()):
        raise NonFiniteError("the input statistics hold NaN or infinite values (the forward pass overflowed?)")
    best: SearchResult | None = None
    errors: list[float] = []
    for alpha in alphas:
        scales = awq_scales(salience, alpha).to(w.dtype)
        quantized = quantize_groupwise(w * scales, bits, group_size, rounding(scales))
        error = error_of(dequantize_groupwise(quantized).div_(scales))
        if not math.isfinite(error):
            raise NonFiniteError(f"the output error at alpha {alpha:g} is {error}")
        errors.append(error)
        if best is None or error < best.error:
            best = SearchResult(alpha, scales, quantized, error, errors)
    assert best is not None
    return SearchResult(best.alpha, best.scales, best.quantized, best.error, errors)
