"""Which integer each weight takes: nearest, nearest corrected by global greedy flips, or GPTQ.

A rounding strategy maps ``u = w / scale + zero`` (per column) to integers in [0, max_int].
Every strategy shares ``round_nearest``; greedy only ever moves an integer to the other
neighbour of ``u``, so with no flips it is nearest rounding, bit for bit. GPTQ (``gptq.py``)
rounds column by column and moves the columns not yet rounded to cancel the error, from the
input's second moment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from awqkit.config import ROUNDINGS
from awqkit.quant.gptq import gptq_rounding
from awqkit.quant.grid import RoundingFn, round_nearest


def outlier_mask(act_mean: torch.Tensor, outlier_percent: float) -> torch.Tensor:
    """True for the top ``outlier_percent`` of channels by |E[x]|: their weights are never flipped."""
    if not 0.0 <= outlier_percent <= 1.0:
        raise ValueError(f"outlier percent must be in [0, 1], got {outlier_percent}")
    n_outliers = round(outlier_percent * act_mean.numel())
    mask = torch.zeros(act_mean.numel(), dtype=torch.bool, device=act_mean.device)
    mask[act_mean.abs().topk(n_outliers).indices] = True
    return mask


def row_output_error(residual: torch.Tensor, unit_impact: torch.Tensor) -> torch.Tensor:
    """e = sum_j m_j (w_j - w'_j) per row, using w - w' = (u - q) * scale = residual * scale.

    Summed in float64; converting first is ~3x faster than sum(dtype=float64) on CPU.
    """
    return (unit_impact * residual).double().sum(dim=1)


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
        # Masks combine by arithmetic, not torch.where / masked_fill: on CPU those run ~10x slower
        # than a multiply, and this runs once per weight per alpha. float64 only for the row sums.
        q = round_nearest(u, scale_cols, max_int)
        residual = u - q  # in [-0.5, 0.5]; a flip moves q one step toward u
        unit_impact = scale_cols * self.act_mean.to(u.dtype)[None, :]
        error = row_output_error(residual, unit_impact)

        direction = torch.copysign(torch.ones((), dtype=u.dtype), residual)  # +1 where u >= q
        impact = unit_impact.mul_(direction)  # the error falls by this much when flipped
        half_range = max_int / 2
        candidate = (q + direction).sub_(half_range).abs_() <= half_range  # the flip stays in range
        candidate &= impact * torch.sign(error).to(u.dtype)[:, None] > 0
        candidate &= ~outlier_mask(self.act_mean, self.outlier_percent)[None, :]

        # Only a clamped u (beyond the range, never a candidate) has |residual| > 0.5: clamp to 0.
        # In place from here on: fresh full-size tensors cost page faults, not only passes.
        distance = residual.abs_().neg_().add_(0.5).clamp_(min=0.0).add_(~candidate, alpha=_NOT_A_CANDIDATE)
        impact.mul_(candidate)
        order, best_k = _best_prefix(distance, impact, error)
        flip = torch.arange(order.shape[1], device=u.device)[None, :] < best_k
        return q.scatter_add(1, order, direction.gather(1, order) * flip)


# The distance given to non-candidates: beyond any candidate's (at most 0.5), so they sort last.
_NOT_A_CANDIDATE = 1.0


def _best_prefix(
    distance: torch.Tensor, impact: torch.Tensor, error: torch.Tensor, first_k: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest-first candidate order and, per row, the prefix length minimising |error - sum|.

    Every candidate's impact has the sign of the row error, so the running sum moves
    monotonically toward and then past the error: |error - sum| falls, then rises. The best
    prefix therefore ends where the sum crosses the error, and only the closest candidates up to
    that point need ordering, so a partial sort that widens until every row crosses is enough.
    Non-candidates sort last with impact 0, so no best prefix ends on one (argmin takes the
    first minimum).
    """
    n = distance.shape[1]
    k = min(first_k, n)
    closest = _closest_columns(distance)
    while True:
        order = closest(k)
        cumulative = impact.gather(1, order).cumsum(dim=1, dtype=torch.float64)
        farthest = distance.gather(1, order[:, -1:]).squeeze(1)
        done = (cumulative[:, -1].abs() >= error.abs()) | (farthest >= _NOT_A_CANDIDATE)
        if k == n or bool(done.all()):
            break
        k = min(4 * k, n)
    cumulative = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative], dim=1)
    return order, (error[:, None] - cumulative).abs().argmin(dim=1, keepdim=True)


def _closest_columns(distance: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """k -> per row, the columns of the k smallest (non-negative) distances, closest first."""
    if distance.device.type == "cpu":
        return _closest_columns_numpy(distance)
    return lambda k: distance.topk(k, dim=1, largest=False, sorted=True).indices


def _closest_columns_numpy(distance: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """As ``_closest_columns``, by numpy's partition + sort of int64 keys: ~5x faster than
    torch.topk on CPU (measured) and exact, since non-negative float32s order like their bit
    patterns, so a key holding the distance's bits above the column index orders by distance,
    ties to the lower column.
    """
    rows, n = distance.shape
    keys = np.empty((rows, n), dtype=np.int64)
    halves = keys.view(np.int32).reshape(rows, n, 2)
    low = 0 if sys.byteorder == "little" else 1
    halves[..., low] = np.arange(n, dtype=np.int32)
    halves[..., 1 - low] = distance.float().contiguous().numpy().view(np.int32)

    def closest(k: int) -> torch.Tensor:
        if k < n:
            keys.partition(k - 1, axis=1)  # in place: np.partition would first copy all the keys
        columns = np.sort(keys[:, :k], axis=1).view(np.int32).reshape(rows, k, 2)[..., low]
        return torch.from_numpy(columns).long()

    return closest


# A rounding factory takes the AWQ scales of one grid point and returns the strategy to use there.
RoundingFactory = Callable[[torch.Tensor], RoundingFn]


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01  # of H's mean diagonal, added to it (raised tenfold where Cholesky fails)
    block_size: int = 128  # columns per lazy update
    act_order: bool = True  # columns by decreasing E[x_j^2] (the grid stays static)


class GptqFactory:
    """GPTQ at each grid point: H = M / (s s^T), the second moment ``M`` of the unscaled input
    seen through the scales (W * s multiplies x / s). ``fell_back``: H could not be factored at
    some grid point, which then rounded to nearest."""

    def __init__(self, second_moment: torch.Tensor, options: GptqOptions):
        self.second_moment, self.options = second_moment.double(), options
        self.fell_back = False

    def __call__(self, scales: torch.Tensor) -> RoundingFn:
        s = scales.to(self.second_moment)
        o = self.options
        rounding = gptq_rounding(self.second_moment / (s[:, None] * s[None, :]), o.damp, o.block_size, o.act_order)
        if rounding is None:
            self.fell_back = True
            return round_nearest
        return rounding


def make_rounding(
    name: str,
    act_mean: torch.Tensor,
    outlier_percent: float,
    second_moment: torch.Tensor | None = None,
    gptq: GptqOptions = GptqOptions(),
) -> RoundingFactory:
    """The rounding for one layer: ``act_mean`` is E[X] of its unscaled input, ``second_moment``
    E[x x^T] (GPTQ only)."""
    if name == "nearest":
        return lambda scales: round_nearest
    if name == "greedy":
        return lambda scales: GreedyFlipRounding(act_mean / scales, outlier_percent)
    if name == "gptq":
        if second_moment is None:
            raise ValueError("gptq rounding needs the input's second moment")
        return GptqFactory(second_moment, gptq)
    raise ValueError(f"unknown rounding {name!r}; choose one of {', '.join(ROUNDINGS)}")
