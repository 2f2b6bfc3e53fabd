"""Which AWQ scales minimise the output error of one linear layer.

For alpha = i / n_grid: s = E[x^2]^alpha (clamped at 1e-5), W_hat = Q(W * s) / s, and the error is
mean((X (W - W_hat)^T)^2). That equals the MSE of X W^T + b against X W_hat^T + b exactly: the bias
cancels, so it never enters, and one product per alpha avoids subtracting two large outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awqkit.quant import GroupQuantized, dequantize_groupwise, quantize_groupwise, round_nearest
from awqkit.rounding import RoundingFactory


def awq_scales(salience: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = salience^alpha, clamped so a dead channel gets 1e-5 rather than 0 (no additive bias)."""
    return salience.pow(alpha).clamp(min=1e-5)


def output_mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ (w - w_hat).T).pow(2).mean().item()


@dataclass(frozen=True)
class SearchResult:
    alpha: float
    scales: torch.Tensor
    quantized: GroupQuantized  # of W * scales
    error: float
    errors: list[float]  # one per grid point, alpha = i / n_grid

    def dequantized(self) -> torch.Tensor:
        """The weight to store in float: Q(W * s) / s."""
        return dequantize_groupwise(self.quantized) / self.scales


def search_alpha(
    w: torch.Tensor,
    x: torch.Tensor,
    salience: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    n_grid: int,
    rounding: RoundingFactory | None = None,
) -> SearchResult:
    """Grid-search alpha for weight ``w`` [out, in] on input tokens ``x`` [n, in].

    The first alpha with the smallest error wins, so ties go to the weaker scaling.
    """
    if n_grid < 1:
        raise ValueError(f"n-grid must be >= 1, got {n_grid}")
    rounding = rounding or (lambda scales: round_nearest)
    best: SearchResult | None = None
    errors: list[float] = []
    for i in range(n_grid + 1):
        alpha = i / n_grid
        scales = awq_scales(salience, alpha).to(w.dtype)
        quantized = quantize_groupwise(w * scales, bits, group_size, rounding(scales))
        error = output_mse(x, w, dequantize_groupwise(quantized) / scales)
        errors.append(error)
        if best is None or error < best.error:
            best = SearchResult(alpha, scales, quantized, error, errors)
    assert best is not None
    return SearchResult(best.alpha, best.scales, best.quantized, best.error, errors)
