"""Row shares: blocks cover every row once, and a row quantized in a block of rows is that row of
the whole weight, bit for bit, for every step workers split (quantize, greedy, clip ratios)."""

import pytest
import torch

from awqkit.quant.clip import clip_ratios
from awqkit.quant.grid import dequantize_groupwise, quantize_groupwise
from awqkit.quant.rounding import make_rounding
from awqkit.quant.rows import ALL_ROWS, row_blocks
from awqkit.quant.search import linear_output_error, scale_candidates, search_scales


@pytest.mark.parametrize(
    "n_rows, world, unit", [(10, 1, 1), (11, 2, 1), (13, 4, 1), (3, 4, 1), (192, 2, 32), (37, 2, 32), (576, 3, 32)]
)
def test_row_blocks_are_whole_chunks_covering_every_row_once_in_order(n_rows, world, unit):
    blocks = row_blocks(n_rows, world, unit)
    assert len(blocks) == world
    assert [r for b in blocks for r in range(b.start, b.stop)] == list(range(n_rows))
    assert all(b.start % unit == 0 for b in blocks)
    chunks = [-(-(b.stop - b.start) // unit) for b in blocks]
    assert max(chunks) - min(chunks) <= 1
    # the chunk sums a block holds are its share of row_blocks over chunks
    assert [b.start // unit for b in blocks] == [c.start for c in row_blocks(-(-n_rows // unit), world, 1)]


def test_linear_output_error_is_the_mse_and_its_chunk_sums_split_by_blocks():
    w, x = _layer(5, out=100)
    w_hat = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    error = linear_output_error(x, w)
    literal = (x.double() @ (w - w_hat).double().T).pow(2).mean().item()
    assert abs(error(w_hat) - literal) <= 1e-5 * literal
    whole = error.chunk_sums(w_hat, slice(0, 100))
    assert whole.shape == (4,)  # 100 rows: chunks of 32, 32, 32, 4
    parts = [error.chunk_sums(w_hat[b], b) for b in row_blocks(100, 2)]
    assert torch.equal(torch.cat(parts), whole)


def _layer(seed: int, out: int = 37, inp: int = 96, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g) * torch.linspace(0.1, 4.0, inp)
    w = torch.randn(out, inp, generator=g)
    w[:, 5] *= 10
    return w, x


@pytest.mark.parametrize("world", [2, 3])
def test_greedy_quantization_of_a_block_of_rows_is_those_rows_of_the_whole(world):
    w, x = _layer(world)
    s = x.pow(2).mean(0).pow(0.5)
    rounding = make_rounding("greedy", x.mean(0), 0.05)(s)
    whole = quantize_groupwise(w * s, 4, 32, rounding)
    assert not torch.equal(whole.q, quantize_groupwise(w * s, 4, 32).q)  # greedy flipped some
    parts = [quantize_groupwise(w[b] * s, 4, 32, rounding) for b in row_blocks(w.shape[0], world)]
    for field in ("q", "scale", "zero"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))
    assert torch.equal(torch.cat([dequantize_groupwise(p) for p in parts]), dequantize_groupwise(whole))


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_ratios_of_a_block_of_rows_are_those_rows_of_the_whole(symmetric):
    w, x = _layer(7)
    whole = clip_ratios(w, x, bits=3, group_size=32, symmetric=symmetric)
    assert (whole < 1).any()
    for block in row_blocks(w.shape[0], 2):
        assert torch.equal(clip_ratios(w[block], x, bits=3, group_size=32, symmetric=symmetric), whole[block])


class _RankZero:
    """Rank 0 of 2 in one process: ``gather`` returns the whole tensor one process computed that
    begins with rank 0's part, so the search sees what the collective would give it."""

    world = 2

    def __init__(self, n_rows: int, computed: list[torch.Tensor]):
        self.mine = row_blocks(n_rows, 2)[0]
        self.computed = computed
        self.gathered = 0

    def part(self, n_rows: int) -> slice:
        return self.mine

    def gather(self, part: torch.Tensor, n_rows: int, unit: int = 32) -> torch.Tensor:
        self.gathered += 1
        for whole in self.computed:
            if whole.shape[1:] == part.shape[1:] and len(whole) == n_rows and torch.equal(whole[: len(part)], part):
                return whole
        raise AssertionError("rank 0 computed rows that one process never computed")


@pytest.mark.parametrize("rounding", ["nearest", "greedy"])
def test_a_search_over_a_share_of_rows_chooses_and_returns_what_one_process_does(rounding):
    w, x = _layer(11, out=77)
    candidates = scale_candidates("activation", [0, 0.25, 0.5, 0.75, 1], x.pow(2).mean(0))
    factory = make_rounding(rounding, x.mean(0), 0.05)
    grid = {"bits": 4, "group_size": 32, "rounding": factory}
    error_of = linear_output_error(x, w)
    one = search_scales(w, candidates, error_of, rows=ALL_ROWS, **grid)
    computed, sums = [], []
    for c in candidates:
        q = quantize_groupwise(w * c.scales, 4, 32, factory(c.scales))
        sums.append(error_of.chunk_sums(dequantize_groupwise(q).div_(c.scales), slice(0, 77)))
        computed.append(torch.cat([q.q, q.scale, q.zero], dim=1))
    rank0 = _RankZero(w.shape[0], [torch.stack(sums, dim=1), *computed])
    split = search_scales(w, candidates, error_of, rows=rank0, **grid)
    assert rank0.gathered == 2  # every candidate's chunk sums at once, then the chosen q, scale, zero
    assert split.alpha == one.alpha and split.errors == one.errors
    for field in ("q", "scale", "zero"):
        assert torch.equal(getattr(split.quantized, field), getattr(one.quantized, field))
