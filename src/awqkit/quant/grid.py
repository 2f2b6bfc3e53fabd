"""How a weight matrix becomes per-group integers, scales and zeros, and back.

Groups run along the input dimension (dim 1). When ``group_size`` does not divide the number of
input features, the last group of every row is shorter and has its own scale and zero.
Each quantize has its dequantize; rounding is a pluggable strategy (see ``rounding.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from awqkit.config import check_quant_args

# (u, scale_cols, max_int) -> integers in [0, max_int]; u = w / scale + zero, per column.
RoundingFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class GroupQuantized:
    """Integers ``q`` [out, in] with per-group ``scale`` and ``zero`` [out, n_groups]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False  # zero is 2^(b-1) in every group


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in]: each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def as_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size], a view when group_size divides in.

    A short last group is padded by repeating the row's last value, which leaves its min and max
    unchanged; the padded columns are dropped again by ``from_groups``.
    """
    out_features, in_features = x.shape
    pad = num_groups(in_features, group_size) * group_size - in_features
    if pad:  # torch's replicate padding refuses 0 rows (a worker's share of a small weight)
        x = torch.cat([x, x[:, -1:].expand(out_features, pad)], dim=1)
    return x.view(out_features, num_groups(in_features, group_size), group_size)


def from_groups(x: torch.Tensor, in_features: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2])[:, :in_features]


def groupwise_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    clip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero point per group.

    Each group's range is widened to include 0. A single-sign or constant group (a ragged last
    group of width 1, every group at group size 1) would otherwise need a zero point outside
    [0, max_int]; clamping it shifts the whole grid and collapses the group's values. With 0 in
    range the zero point needs no clamping, so every value comes back within half a step, and 0
    itself is exact. Mixed-sign groups already contain 0: their min and max are unchanged.

    Asymmetric: scale = (max - min) / max_int, zero = round(-min / scale). Symmetric: zero is
    2^(b-1) and scale = max|w| / (2^(b-1) - 1/2), compressed-tensors' grid: the integers reach
    -2^(b-1) steps below zero and 2^(b-1) - 1 above, so the largest magnitude on the short side
    lands half a step past the top and comes back within half a step. ``clip`` [out, n_groups]
    multiplies each group's range by a ratio in (0, 1]: values beyond it clamp to the range's ends.
    """
    max_int = 2**bits - 1
    grouped = as_groups(w, group_size)
    w_min, w_max = grouped.amin(dim=2).clamp(max=0), grouped.amax(dim=2).clamp(min=0)
    if clip is not None:
        w_min, w_max = w_min * clip, w_max * clip
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (torch.maximum(-w_min, w_max) / (half - 0.5)).clamp(min=1e-8)
        return scale, torch.full_like(scale, float(half))
    scale = ((w_max - w_min) / max_int).clamp(min=1e-8)
    zero = torch.round(-w_min / scale).clamp(0, max_int)
    return scale, zero


def round_nearest(u: torch.Tensor, scale_cols: torch.Tensor, max_int: int) -> torch.Tensor:
    return torch.round(u).clamp_(0, max_int)


def quantize_groupwise(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    rounding: RoundingFn = round_nearest,
    *,
    symmetric: bool = False,
    clip: torch.Tensor | None = None,
) -> GroupQuantized:
    """Quantize ``w`` [out, in] to ``bits``-bit integers in groups of ``group_size`` columns."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    check_quant_args(bits, group_size)
    scale, zero = groupwise_qparams(w, bits, group_size, symmetric=symmetric, clip=clip)
    in_features = w.shape[1]
    u = from_groups((as_groups(w, group_size) / scale[..., None]).add_(zero[..., None]), in_features)
    q = rounding(u, expand_groups(scale, group_size, in_features), 2**bits - 1)
    return GroupQuantized(q=q, scale=scale, zero=zero, bits=bits, group_size=group_size, symmetric=symmetric)


def dequantize_groupwise(qw: GroupQuantized) -> torch.Tensor:
    grouped = as_groups(qw.q.to(qw.scale.dtype), qw.group_size)
    return from_groups((grouped - qw.zero[..., None]).mul_(qw.scale[..., None]), qw.q.shape[1])
