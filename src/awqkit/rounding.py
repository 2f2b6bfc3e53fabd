"""Which integer each weight takes: nearest, or nearest corrected by global greedy flips.

A rounding strategy maps ``u = w / scale + zero`` (per column) to integers in [0, max_int].
Both strategies share ``round_nearest``; greedy only ever moves an integer to the other
neighbour of ``u``, so with no flips it is nearest rounding, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from awqkit.quant import RoundingFn, round_nearest


def outlier_mask(act_mean: torch.Tensor, outlier_percent: float) -> torch.Tensor:
    """True for the top ``outlier_percent`` of channels by |E[x]|: their weights are never flipped."""
    if not 0.0 <= outlier_percent <= 1.0:
        raise ValueError(f"outlier percent must be in [0, 1], got {outlier_percent}")
    n_outliers = round(outlier_percent * act_mean.numel())
    mask = torch.zeros(act_mean.numel(), dtype=torch.bool, device=act_mean.device)
    mask[act_mean.abs().topk(n_outliers).indices] = True
    return mask


def row_output_error(u: torch.Tensor, q: torch.Tensor, unit_impact: torch.Tensor) -> torch.Tensor:
    """e = sum_j m_j (w_j - w'_j) per row, using w - w' = (u - q) * scale."""
    return (unit_impact * (u.double() - q.double())).sum(dim=1)


@dataclass(frozen=True)
class GreedyFlipRounding:
    """Global greedy flips per output row (vectorised over rows).

    ``act_mean`` is m = E[x] of the input the quantized weight multiplies (E[X / s] under AWQ
    scales). Starting from nearest rounding, a weight is a candidate when flipping it to its other
    neighbouring integer moves the row error toward zero, stays in range and its channel is not an
    outlier. Candidates closest to the rounding boundary go first; the prefix length that leaves
    the smallest |error| is applied (possibly none).
    """

    act_mean: torch.Tensor
    outlier_percent: float = 0.05

    def __call__(self, u: torch.Tensor, scale_cols: torch.Tensor, max_int: int) -> torch.Tensor:
        q = round_nearest(u, scale_cols, max_int)
        unit_impact = self.act_mean.double()[None, :] * scale_cols.double()
        error = row_output_error(u, q, unit_impact)

        direction = torch.where(u >= q, 1.0, -1.0).to(q.dtype)
        impact = unit_impact * direction  # the error falls by this much when flipped
        in_range = ((q + direction) >= 0) & ((q + direction) <= max_int)
        toward_zero = torch.sign(impact) == torch.sign(error)[:, None]
        not_outlier = ~outlier_mask(self.act_mean, self.outlier_percent)[None, :]
        candidate = in_range & toward_zero & (impact != 0) & not_outlier

        boundary_distance = torch.where(candidate, 0.5 - (u - q).abs(), torch.inf)
        order, best_k = _best_prefix(boundary_distance, torch.where(candidate, impact, 0.0), error)
        flip_sorted = torch.arange(order.shape[1], device=u.device)[None, :] < best_k
        flip = torch.zeros_like(candidate).scatter(1, order, flip_sorted)
        return q + direction * flip


def _best_prefix(
    distance: torch.Tensor, impact: torch.Tensor, error: torch.Tensor, first_k: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest-first candidate order and, per row, the prefix length minimising |error - sum|.

    Every candidate's impact has the sign of the row error, so the running sum moves
    monotonically toward and then past the error: |error - sum| falls, then rises. The best
    prefix therefore ends where the sum crosses the error, and only the closest candidates up to
    that point need ordering, so a partial sort (topk) that widens until every row crosses is
    enough (non-candidates carry distance inf and impact 0).
    """
    n = distance.shape[1]
    k = min(first_k, n)
    while True:
        nearest_k, order = distance.topk(k, dim=1, largest=False, sorted=True)
        cumulative = impact.gather(1, order).cumsum(dim=1)
        done = (cumulative[:, -1].abs() >= error.abs()) | nearest_k[:, -1].isinf()  # crossed, or no more
        if k == n or bool(done.all()):
            break
        k = min(4 * k, n)
    cumulative = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative], dim=1)
    return order, (error[:, None] - cumulative).abs().argmin(dim=1, keepdim=True)


# A rounding factory takes the AWQ scales of one grid point and returns the strategy to use there.
RoundingFactory = Callable[[torch.Tensor], RoundingFn]
ROUNDINGS = ("nearest", "greedy")


def make_rounding(name: str, act_mean: torch.Tensor, outlier_percent: float) -> RoundingFactory:
    """The rounding for one layer: ``act_mean`` is E[X] of its unscaled input."""
    if name == "nearest":
        return lambda scales: round_nearest
    if name == "greedy":
        return lambda scales: GreedyFlipRounding(act_mean / scales, outlier_percent)
    raise ValueError(f"unknown rounding {name!r}; choose one of {', '.join(ROUNDINGS)}")
