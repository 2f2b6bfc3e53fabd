"""Which part of each group's range to keep: clipping chosen by output error (AutoAWQ's auto_clip).

After the scale search, every group of W * s may shrink its range [min, max] by a ratio from
``CLIP_RATIOS`` (1 first: no shrink), values beyond it clamping to the ends. Each (row, group)
keeps the ratio with the least error of its own share of the output, mean_t (x_g . (w_g - w'_g))^2
over the search tokens, with x = X / s the input the scaled weight multiplies. Those shares
ignore the cross terms between groups, so the whole layer is measured again with the chosen
ratios, by the search's own error function, and the clipping is kept only if that error is lower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from awqkit.errors import NonFiniteError
from awqkit.quant.grid import dequantize_groupwise, num_groups, quantize_groupwise
from awqkit.quant.rounding import RoundingFactory
from awqkit.quant.rows import ALL_ROWS, RowShare, gather_quantized
from awqkit.quant.search import ErrorFn, SearchResult, whole_error

# AutoAWQ's grid: shrink by up to 45% in steps of 5%.
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))


# Elements of one chunk of per-group products [groups, tokens, rows]: bounds the working memory.
_CHUNK_ELEMENTS = 1 << 24


def group_output_errors(x: torch.Tensor, d: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean_t (x[t, g] . d[r, g])^2 for every row r and group g: [out, n_groups], in float32.

    ``x`` [n, in] are tokens, ``d`` [out, in] a weight difference. A short last group is padded
    with zeros, which add nothing to its products.
    """
    n, in_features = x.shape
    groups = num_groups(in_features, group_size)
    pad = groups * group_size - in_features
    xg = torch.nn.functional.pad(x.float(), (0, pad)).view(n, groups, group_size).transpose(0, 1)
    dg = torch.nn.functional.pad(d.float(), (0, pad)).view(d.shape[0], groups, group_size).permute(1, 2, 0)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * d.shape[0]))
    errors = [torch.bmm(xg[g : g + step], dg[g : g + step]).square_().mean(dim=1) for g in range(0, groups, step)]
    return torch.cat(errors).T  # [groups, out] -> [out, groups]


def clip_ratios(
    w: torch.Tensor,
    x: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    ratios: Sequence[float] = CLIP_RATIOS,
    frozen_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per (row, group) of ``w`` [out, in], the ratio in ``ratios`` with the least own output error
    on tokens ``x`` [n, in] (nearest rounding); ties to the earlier ratio. ``frozen_rows`` keep 1."""
    groups = num_groups(w.shape[1], group_size)
    best = torch.ones(w.shape[0], groups, dtype=w.dtype, device=w.device)
    best_error = None
    for ratio in ratios:
        clip = torch.full_like(best, ratio)
        q = quantize_groupwise(w, bits, group_size, symmetric=symmetric, clip=clip)
        error = group_output_errors(x, w - dequantize_groupwise(q), group_size)
        if best_error is None:
            best.fill_(ratio)
            best_error = error
            continue
        better = error < best_error
        best = torch.where(better, clip, best)
        best_error = torch.minimum(error, best_error)
    if frozen_rows is not None:
        best[frozen_rows] = 1.0
    return best


def clip_search(
    w: torch.Tensor,
    result: SearchResult,
    x: torch.Tensor,
    error_of: ErrorFn,
    *,
    rounding: RoundingFactory,
    symmetric: bool = False,
    frozen_rows: torch.Tensor | None = None,
    rows: RowShare = ALL_ROWS,
) -> SearchResult:
    """``result`` with clipped groups where that lowers the layer's error; else ``result`` as is
    (its ``clip`` all ones). ``w`` is the unscaled weight, ``x`` the search tokens (unscaled).
    This process chooses the ratios of its ``rows`` only, as in ``search_scales``."""
    s, q = result.scales, result.quantized
    n_rows = w.shape[0]
    part = rows.part(n_rows)
    mine = w[part] * s
    frozen = None if frozen_rows is None else frozen_rows[part]
    clip_mine = clip_ratios(
        mine, x.to(w.dtype) / s, bits=q.bits, group_size=q.group_size, symmetric=symmetric, frozen_rows=frozen
    )
    clip = rows.gather(clip_mine, n_rows)
    unclipped = replace(result, clip=torch.ones_like(clip))
    if bool((clip == 1).all()):
        return unclipped
    quantized = quantize_groupwise(mine, q.bits, q.group_size, rounding(s), symmetric=symmetric, clip=clip_mine)
    error = whole_error(error_of, rows, dequantize_groupwise(quantized).div_(s), n_rows)
    if not math.isfinite(error):
        raise NonFiniteError(f"the output error with clipping is {error}")
    if not error < result.error:
        return unclipped
    return replace(result, quantized=gather_quantized(rows, quantized, n_rows), error=error, clip=clip)
