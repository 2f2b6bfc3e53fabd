"""Several torch.distributed workers on one run: who holds which calibration batches, and how
what they measured meets.

``torchrun --nproc-per-node N -m awqkit quantize ...`` starts N workers (NCCL between GPUs, gloo
between CPUs; several nodes with torchrun's rendezvous flags). Calibration batch b belongs to
worker b mod N, which alone runs it through the blocks and keeps its hidden states. The per-batch
statistics are gathered (``everyones_tensors``) and summed in batch order, so every worker holds
exactly the sums one worker would have. The search and the rounding split each weight by output
rows (awqkit.quant.rows): every worker quantizes its block of rows for every candidate and sums its
part of each candidate's error (its row chunks of a linear's output; its calibration windows of
a module's, on the candidate gathered whole); the part sums are gathered once per search, so every
worker measures the same errors and chooses the same scales; worker 0 writes the checkpoint.
Without torchrun's environment there is one worker and nothing here communicates.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from awqkit.errors import WorkerStopped
from awqkit.quant.rows import ROW_CHUNK, row_blocks


@contextmanager
def _collective() -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:  # gloo and NCCL report a lost peer as a RuntimeError
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WorkerStopped(f"another worker of this run stopped ({first[:200]})") from None


@dataclass(frozen=True)
class Workers:
    rank: int = 0
    world: int = 1

    def batches(self, n_batches: int) -> list[int]:
        """The calibration batches this worker runs."""
        return list(range(self.rank, n_batches, self.world))

    @property
    def writes(self) -> bool:
        """Worker 0 writes the checkpoint; the others compute the same choices and write nothing."""
        return self.rank == 0

    def everyones_tensors(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every worker's ``tensors`` (1-D, of any lengths; each position one dtype on every
        worker), in rank order, on every worker: one exchange of lengths, then one per position,
        with no pickling (``all_gather_object`` pickles: slow for the megabytes of calibration statistics)."""
        if self.world == 1:
            return [tensors]
        device = tensors[0].device
        lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=device)
        every_lengths = [torch.empty_like(lengths) for _ in range(self.world)]
        with _collective():
            dist.all_gather(every_lengths, lengths)
        theirs: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        for i, tensor in enumerate(tensors):
            counts = [int(n[i]) for n in every_lengths]
            padded = tensor.new_zeros(max(counts))
            padded[: tensor.numel()] = tensor
            received = [torch.empty_like(padded) for _ in range(self.world)]
            with _collective():
                dist.all_gather(received, padded)
            for rank, count in enumerate(counts):
                theirs[rank].append(received[rank][:count])
        return theirs

    def broadcast(self, value: Any, source: int = 0) -> Any:
        """``value`` as worker ``source`` holds it, on every worker."""
        if self.world == 1:
            return value
        box = [value]
        with _collective():
            dist.broadcast_object_list(box, src=source)
        return box[0]

    def part(self, n_rows: int, unit: int = ROW_CHUNK) -> slice:
        """This worker's block of a weight's output rows (awqkit.quant.rows.RowShare)."""
        return row_blocks(n_rows, self.world, unit)[self.rank]

    def gather(self, part: torch.Tensor, n_rows: int, unit: int = ROW_CHUNK) -> torch.Tensor:
        """Every worker's block of rows, stacked in row order, on every worker."""
        if self.world == 1:
            return part
        blocks = row_blocks(n_rows, self.world, unit)
        longest = max(block.stop - block.start for block in blocks)
        padded = part.new_zeros((longest, *part.shape[1:]))
        padded[: part.shape[0]] = part
        received = [torch.empty_like(padded) for _ in blocks]
        with _collective():
            dist.all_gather(received, padded)
        return torch.cat([r[: block.stop - block.start] for r, block in zip(received, blocks)])

    def barrier(self) -> None:
        if self.world > 1:
            with _collective():
                dist.barrier()


def start_workers(device: torch.device) -> tuple[Workers, torch.device]:
    """This process's place among torchrun's workers, and its device (``cuda:LOCAL_RANK`` on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A worker that dies ends the others' collectives; torchrun then stops the whole run.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Workers(dist.get_rank(), dist.get_world_size()), device
