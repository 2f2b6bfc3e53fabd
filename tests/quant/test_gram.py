"""Gram matrices: each batch's X^T X, added in batch order whatever order the batches come in."""

import itertools

import pytest
import torch

from awqkit.quant.gram import BatchOrderSum, batch_gram


def _batches(n: int = 5, width: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [batch_gram(torch.randn(2, 7, width, generator=g) * 10 ** torch.randn(width, generator=g)) for _ in range(n)]


def _in_order(values: list[torch.Tensor]) -> torch.Tensor:
    total = values[0].double().clone()
    for value in values[1:]:
        total += value.double()
    return total


def test_a_batch_gram_is_x_transpose_x_over_every_token():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    flat = x.reshape(-1, 8)
    literal = sum(torch.outer(t, t) for t in flat)
    assert torch.allclose(batch_gram(x).double(), literal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4)))[::5])
def test_any_arrival_order_gives_the_in_order_bits(order):
    values = _batches(4)
    total = BatchOrderSum()
    for batch in order:
        total.add(batch, values[batch])
    assert torch.equal(total.value(), _in_order(values))
    assert not total.waiting and total.upto == 4  # every batch joined the running sum


@pytest.mark.parametrize("world", [2, 3])
def test_workers_pooling_their_batches_hold_the_one_worker_bits(world):
    values = _batches(7)
    parts = [BatchOrderSum() for _ in range(world)]
    for batch, value in enumerate(values):
        parts[batch % world].add(batch, value)  # Workers.batches: every world-th batch
    assert len(parts[0].waiting) == len(range(0, 7, world)) - 1  # only batch 0 joined worker 0's prefix
    assert torch.equal(BatchOrderSum.pooled(parts).value(), _in_order(values))


def test_a_batch_with_nothing_to_add_moves_the_prefix_on():
    values = _batches(3)
    total = BatchOrderSum()
    total.add(0, values[0])
    total.add(1, None)  # an expert no token of batch 1 was routed to
    total.add(2, values[2])
    assert total.upto == 3 and not total.waiting
    assert torch.equal(total.value(), _in_order([values[0], values[2]]))


def test_a_batch_added_twice_is_an_error():
    total = BatchOrderSum()
    total.add(0, torch.ones(2, 2))
    with pytest.raises(ValueError, match="batch 0 is already in the sum"):
        total.add(0, torch.ones(2, 2))
