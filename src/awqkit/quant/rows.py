"""Which output rows of a weight this process quantizes, and how every process's rows meet.

Rows are independent in group-wise quantization, in clipping and in greedy rounding, so workers
split them: each quantizes one contiguous block of rows and the blocks are gathered, in row order,
wherever a whole weight is needed (a module's output error, the chosen result). Every worker then
holds the same tensor, so what follows runs on identical inputs and chooses alike, and a row
computed in a block of rows is the row computed in the whole weight (tests check it). Blocks are
made of whole chunks of ``ROW_CHUNK`` rows, the unit in which a linear's output error is summed,
so the workers' partial error sums are the one-worker sums (search.LinearOutputError).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch

from awqkit.quant.grid import GroupQuantized

# Rows per partial sum of a linear's output error, and so the unit of every split.
ROW_CHUNK = 32


class RowShare(Protocol):
    world: int  # how many processes share the rows

    def part(self, n_rows: int, unit: int = ROW_CHUNK) -> slice:
        """This process's rows of a weight with ``n_rows`` output rows (``unit=1``: its share of
        ``n_rows`` single items, such as calibration windows)."""
        ...

    def gather(self, part: torch.Tensor, n_rows: int, unit: int = ROW_CHUNK) -> torch.Tensor:
        """Every process's ``part`` stacked in order: all ``n_rows`` rows, on every process.
        ``unit=1`` gathers one entry per chunk (``n_rows`` then counts chunks)."""
        ...


def row_blocks(n_rows: int, world: int, unit: int = ROW_CHUNK) -> list[slice]:
    """``n_rows`` cut into ``world`` contiguous blocks of whole ``unit``-row chunks (the last chunk
    may be short), the chunk counts differing by at most one."""
    size, extra = divmod(-(-n_rows // unit), world)
    starts = [min(n_rows, (rank * size + min(rank, extra)) * unit) for rank in range(world + 1)]
    return [slice(starts[rank], starts[rank + 1]) for rank in range(world)]


class AllRows:
    """One process: every row is its own."""

    world = 1

    def part(self, n_rows: int, unit: int = ROW_CHUNK) -> slice:
        return slice(0, n_rows)

    def gather(self, part: torch.Tensor, n_rows: int, unit: int = ROW_CHUNK) -> torch.Tensor:
        return part


ALL_ROWS = AllRows()


def gather_quantized(rows: RowShare, part: GroupQuantized, n_rows: int) -> GroupQuantized:
    """The whole weight's integers, scales and zeros from every process's rows, in one exchange."""
    if rows.world == 1:  # the world, not this process's rows: a process holding every row still joins
        return part
    pieces = (part.q, part.scale, part.zero)
    whole = rows.gather(torch.cat(pieces, dim=1), n_rows)  # float32 holds the integers exactly
    q, scale, zero = (p.to(piece.dtype) for p, piece in zip(whole.split([p.shape[1] for p in pieces], dim=1), pieces))
    return replace(part, q=q, scale=scale, zero=zero)
