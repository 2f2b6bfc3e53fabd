"""Second-order statistics of a linear's input: the Gram matrix G = sum_t x_t x_t^T.

G holds all a weight's output error needs: for a change dW of the weight, the squared output
error summed over the tokens is sum_t |dW x_t|^2 = tr(dW G dW^T). Each batch's G is one float32
product (the inputs upcast from the compute dtype); the batches are added in float64 in batch
order, whatever order they arrive in and whichever worker ran them, so N workers hold the bits
one worker holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def batch_gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X [in, in] of one batch's inputs [..., in], a float32 product."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


class BatchOrderSum:
    """A sum of per-batch tensors taken in batch order.

    ``total`` holds batches 0..upto-1 added in float64. A batch that arrives before one of its
    predecessors waits (a worker running every other batch holds its own until the pool); one
    that continues the prefix is added at once, so one worker holds one running sum. ``None``
    says a batch has nothing to add (an expert no token of it was routed to).
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.upto = 0
        self.waiting: dict[int, torch.Tensor | None] = {}

    def add(self, batch: int, value: torch.Tensor | None) -> None:
        if batch < self.upto or batch in self.waiting:
            raise ValueError(f"batch {batch} is already in the sum")
        self.waiting[batch] = value
        while self.upto in self.waiting:
            self._add_to_total(self.waiting.pop(self.upto))
            self.upto += 1

    def _add_to_total(self, value: torch.Tensor | None) -> None:
        if value is not None:
            value = value.double()
            self.total = value.clone() if self.total is None else self.total.add_(value)

    @classmethod
    def pooled(cls, sums: Iterable[BatchOrderSum]) -> BatchOrderSum:
        """The sum of every batch of ``sums`` (each batch in one of them) in batch order: the one
        holding the longest prefix (batch 0's), then every waiting batch added in order."""
        sums = list(sums)
        pooled = cls()
        head = max(sums, key=lambda s: s.upto)
        if head.total is not None:
            pooled.total = head.total.clone()
        pooled.upto = head.upto
        for batch, value in sorted(((b, v) for s in sums for b, v in s.waiting.items()), key=lambda item: item[0]):
            pooled.add(batch, value)
        return pooled

    def value(self) -> torch.Tensor:
        """The float64 sum of every batch given, in batch order (those after a batch never given
        too: a worker's share before the pool)."""
        total = None if self.total is None else self.total.clone()
        for batch in sorted(self.waiting):
            value = self.waiting[batch]
            if value is not None:
                total = value.double().clone() if total is None else total.add_(value.double())
        if total is None:
            raise RuntimeError("no batch added anything to the sum")
        return total
