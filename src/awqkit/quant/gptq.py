"""GPTQ's error-compensating rounding, on a grid fixed before it runs (static groups).

For a weight W [out, in] multiplying inputs with second moment H = E[x x^T], GPTQ rounds one
column at a time and moves the columns not yet rounded to cancel the output error it just made:
with U the upper Cholesky factor of H^-1, rounding column j with error e_j = (w_j - q_j) / U_jj
changes every later column k by -e_j U_jk. Updates run on lazy blocks of columns (the tail of the
weight moves once per block, by one product), which gives the same result as column by column.

Here the grid (each group's scale and zero) is fixed before the loop, from the min-max ranges of
W * s, so the integers are plain group-wise ones every export holds, with or without act order
(columns taken in order of decreasing H_jj, the most active input first, "act order inside static
groups"). The loop runs on u = w / scale + zero: a change dw of column k is dw / scale_k in u.
With H = I no column moves, and the result is nearest rounding, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awqkit.quant.grid import RoundingFn, round_nearest
from awqkit.quant.rows import ROW_CHUNK

# Dampening tries: H + damp * mean(diag H) * I, damp raised tenfold until Cholesky succeeds.
DAMP_TRIES = 4


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """The upper Cholesky factor U of (H + lambda I)^-1 (U^T U = (H + lambda I)^-1), lambda =
    ``damp`` times the mean diagonal of H (``damp`` itself for an all-zero H), raised tenfold up
    to ``DAMP_TRIES`` times until the factorizations succeed; None if they never do. float64."""
    h = h.double()
    mean_diagonal = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(DAMP_TRIES):
        damped = h + damp * 10**attempt * (mean_diagonal if mean_diagonal > 0 else 1.0) * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper
    return None


def act_order(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing H_jj (ties in column order)."""
    return torch.sort(h.diagonal(), descending=True, stable=True).indices


@dataclass(frozen=True)
class GptqRounding:
    """GPTQ's column loop as a rounding strategy of the grid (``grid.RoundingFn``).

    ``upper``: the upper Cholesky factor of the damped H^-1, H the second moment of the input the
    rounded weight multiplies, in the column ``order`` the loop takes (None: stored order).
    """

    upper: torch.Tensor
    order: torch.Tensor | None = None
    block_size: int = 128

    def __call__(self, u: torch.Tensor, scale_cols: torch.Tensor, max_int: int) -> torch.Tensor:
        order = self.order
        if order is not None:
            u, scale_cols = u[:, order], scale_cols[:, order]
        q = torch.empty_like(u)
        u = u.clone()  # the columns not yet rounded move
        upper = self.upper.to(u.dtype)
        n = u.shape[1]
        for start in range(0, n, self.block_size):
            end = min(start + self.block_size, n)
            errors = torch.empty(u.shape[0], end - start, dtype=u.dtype, device=u.device)
            for j in range(start, end):
                q[:, j] = round_nearest(u[:, j], scale_cols[:, j], max_int)
                # The weight error of column j over U_jj, then its share moved onto the block's later columns.
                error = (u[:, j] - q[:, j]).mul_(scale_cols[:, j]).div_(upper[j, j])
                errors[:, j - start] = error
                if j + 1 < end:
                    u[:, j + 1 : end] -= error[:, None] * upper[j, j + 1 : end] / scale_cols[:, j + 1 : end]
            if end < n:
                u[:, end:] -= _row_chunked_product(errors, upper[start:end, end:]).div_(scale_cols[:, end:])
        if order is not None:
            q = torch.empty_like(q).index_copy_(1, order, q)
        return q


def _row_chunked_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in chunks of ``ROW_CHUNK`` rows, so a row's bits never depend on how many rows a
    worker holds (its share is whole chunks)."""
    return torch.cat([a[i : i + ROW_CHUNK] @ b for i in range(0, a.shape[0], ROW_CHUNK)])


def gptq_rounding(second_moment: torch.Tensor, damp: float, block_size: int, ordered: bool) -> RoundingFn | None:
    """GPTQ for a weight whose input has second moment ``second_moment``; None where H cannot
    be factored at any dampening (the caller rounds to nearest and records it)."""
    order = act_order(second_moment) if ordered else None
    h = second_moment if order is None else second_moment[order][:, order]
    upper = inverse_cholesky(h, damp)
    if upper is None:
        return None
    return GptqRounding(upper.float(), order, block_size)
