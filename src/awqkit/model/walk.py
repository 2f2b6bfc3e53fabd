"""The block walk: one block's input statistics at a time, while the decoder runs block by block.

Block i sees the float outputs of block i-1. Per linear the walk keeps only float64 running sums of
x, x^2 and |x| and a pre-drawn token subsample for the search (and, when asked, the Gram matrix of
the input), so memory holds one block's statistics plus the hidden states of the windows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from awqkit.errors import NonFiniteError
from awqkit.model.experts import routed_tokens, set_every_token
from awqkit.model.layout import DecoderLayout, block_linears
from awqkit.quant.gram import BatchOrderSum, batch_gram
from awqkit.workers import Workers


def search_token_indices(n_tokens: int, max_tokens: int, seed: int) -> torch.Tensor:
    """Sorted flat indices of the tokens the alpha search measures its error on."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=generator)[:max_tokens].sort().values


@dataclass
class LinearStats:
    """Statistics of one linear's input over all calibration tokens, kept per batch.

    Each batch adds float64 sums of x, x^2 and |x| and its share of the search tokens; the totals
    add the batches up in batch order, so workers that each ran some batches and then pooled
    them (``_pool``) hold exactly what one worker running them all would. ``gram``, when kept,
    adds up each batch's X^T X the same way.
    """

    in_features: int
    device: torch.device | str = "cpu"
    # batch -> (sum x, sum x^2, sum |x|, tokens, search-token rows)
    batches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]] = field(default_factory=dict)
    gram: BatchOrderSum | None = None

    @classmethod
    def empty(cls, in_features: int, device: torch.device | str = "cpu", gram: bool = False) -> LinearStats:
        return cls(in_features, device, gram=BatchOrderSum() if gram else None)

    def add(self, x: torch.Tensor, sample_rows: torch.Tensor, batch: int | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        x64 = x.double()
        batch = len(self.batches) if batch is None else batch
        sums = (x64.sum(dim=0), x64.square().sum(dim=0), x64.abs().sum(dim=0))
        self.batches[batch] = (*sums, x.shape[0], x[sample_rows.to(x.device)])
        if self.gram is not None:
            self.gram.add(batch, batch_gram(x))

    def _total(self, part: int) -> torch.Tensor:
        total = torch.zeros(self.in_features, dtype=torch.float64, device=self.device)
        for batch in sorted(self.batches):
            total += self.batches[batch][part]
        return total

    @property
    def count(self) -> int:
        return sum(entry[3] for entry in self.batches.values())

    def mean(self) -> torch.Tensor:
        return self._total(0) / self.count

    def mean_square(self) -> torch.Tensor:
        """The AWQ salience E[x_j^2]."""
        return self._total(1) / self.count

    def mean_abs(self) -> torch.Tensor:
        """E|x_j|, the activation side of duo scaling."""
        return self._total(2) / self.count

    def search_tokens(self) -> torch.Tensor:
        return torch.cat([self.batches[batch][4] for batch in sorted(self.batches)])

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] [in, in] over every calibration token (float64): the Gram matrix over the count."""
        if self.gram is None:
            raise RuntimeError("this walk kept no Gram matrices (walk_blocks(gram=True))")
        return self.gram.value() / self.count


BlockArgs = tuple[tuple, dict]  # positional args after hidden_states, and keyword args


def window_count(inputs: BlockArgs) -> int:
    """How many calibration windows a module's recorded inputs hold: its hidden states' batch size."""
    args, kwargs = inputs
    return (args[0] if args else kwargs["hidden_states"]).shape[0]


def window_of(inputs: BlockArgs, window: int, n: int | None = None) -> BlockArgs:
    """A module's recorded inputs for one calibration window: every tensor of at least two
    dimensions whose first is the batch of ``n`` windows (hidden states, rotary cos/sin, a 4-D
    mask) cut to that window; the rest (cache positions, shared masks of batch 1, None) as recorded.
    ``n`` defaults to the batch size of the hidden states among the inputs."""
    n = window_count(inputs) if n is None else n

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[window : window + 1] if value.dim() >= 2 and value.shape[0] == n else value
        if isinstance(value, (list, tuple)):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    args, kwargs = inputs
    return cut(args), cut(kwargs)


@dataclass
class BlockInputs:
    """What enters the blocks: block 0's hidden states and each block's own arguments, per batch
    held here (all of them, or a worker's share: ``batches`` names them), and every batch's size."""

    hidden: list[torch.Tensor]
    args: list[list[BlockArgs]]
    batches: list[int]  # the batches held, in order
    batch_tokens: list[int]  # tokens in every batch of the run, held here or not

    def to(self, device: torch.device) -> BlockInputs:
        return BlockInputs(moved(self.hidden, device), moved(self.args, device), self.batches, self.batch_tokens)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` of every tensor inside nested tuples, lists and dicts; anything else as is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def moved(value: Any, device: torch.device | str) -> Any:
    """Tensors inside nested tuples, lists and dicts moved to ``device``; anything else as is."""
    return _map_tensors(value, lambda t: t.to(device))


def hidden_of(output: Any) -> torch.Tensor:
    """A block's hidden states from what it returns: the tensor, or the first of a tuple or list
    (OpenAI GPT's blocks return a list)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def first_window_probe(inputs: BlockInputs, index: int = 0) -> Callable[[nn.Module], torch.Tensor]:
    """Runs a block, in float32 on the CPU, on the first calibration window entering block ``index``
    (held by this worker) with that block's own arguments: what scale-group discovery probes."""
    hidden = inputs.hidden[0]
    args, kwargs = moved(window_of(inputs.args[index][0], 0, hidden.shape[0]), "cpu")
    as_float = _map_tensors((hidden[:1].cpu(), args, kwargs), lambda t: t.float() if t.is_floating_point() else t)

    def probe(block: nn.Module) -> torch.Tensor:
        h, a, k = as_float
        out = block(h, *a, **k)
        return hidden_of(out)

    return probe


class _PastLastBlock(Exception):
    """Raised by the last pass-through block: the decoder's norm and head are not needed."""


def capture_block_inputs(
    layout: DecoderLayout,
    windows: torch.Tensor,
    batch_size: int,
    dtype: torch.dtype,
    batches: Sequence[int] | None = None,
) -> BlockInputs:
    """Hidden states entering block 0, and the arguments each block receives, per batch of
    ``batch_size`` windows (only ``batches``, a worker's share, when given).

    Arguments are captured per block, not once at block 0: models that alternate attention types
    (Gemma3: sliding vs full, with different rotary bases and masks) pass each block its own.
    The blocks are replaced by pass-throughs and the forward stops after the last one, so this
    costs one embedding lookup per batch and needs no weights but the embeddings. A pass-through
    returns the hidden states as most blocks do; a decoder that unpacks its blocks' output into
    two values (Bamba's ``hidden_states, attn_weights = decoder_layer(...)``) gets a pair.
    """
    records: list[BlockArgs] = []
    first_inputs: list[torch.Tensor] = []
    last = len(layout.blocks) - 1
    returns_pair = False

    def pass_through(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first_inputs.append(hidden)
            records.append((args[1:], kwargs))
            if index == last:
                raise _PastLastBlock
            return (hidden, None) if returns_pair else hidden

        return forward

    per_block: list[list[BlockArgs]] = [[] for _ in layout.blocks]
    all_batches = windows.split(batch_size)
    held = list(range(len(all_batches))) if batches is None else list(batches)
    for index, block in enumerate(layout.blocks):
        block.forward = pass_through(index)
    embed = layout.decoder.get_input_embeddings()

    def run(batch: torch.Tensor) -> None:
        records.clear()
        try:
            layout.decoder(inputs_embeds=embed(batch.to(embed.weight.device)).to(dtype), use_cache=False)
        except _PastLastBlock:
            pass

    try:
        with torch.no_grad():
            for number, batch in enumerate(all_batches[b] for b in held):
                try:
                    run(batch)
                except (ValueError, TypeError):  # a decoder unpacking its blocks' output
                    if number > 0 or returns_pair or len(layout.blocks) < 2:
                        raise
                    returns_pair = True
                    first_inputs.clear()
                    run(batch)
                for index, args in enumerate(records):
                    per_block[index].append(args)
    finally:
        for block in layout.blocks:
            del block.forward
    return BlockInputs(first_inputs, per_block, held, [b.numel() for b in all_batches])


# Block index -> the block's parameters and persistent buffers as stored (CPU, checkpoint dtype).
BlockState = Callable[[int], dict[str, torch.Tensor]]


def in_memory_state(layout: DecoderLayout) -> BlockState:
    return lambda index: {name: t.detach() for name, t in layout.blocks[index].state_dict().items()}


@dataclass
class BlockVisit:
    index: int
    # The block in float32 on the compute device: what the caller searches, folds and quantizes.
    block: nn.Module
    # The same block in the compute dtype, for forwards (the same object when that is float32).
    forward: nn.Module
    stats: dict[str, LinearStats]  # per linear name; linears fed the same tensor share one object
    # (args, kwargs) that each requested submodule received in the first calibration batch
    module_inputs: dict[str, BlockArgs]
    # The block's float outputs before the caller touched it: the next block's inputs.
    outputs: list[torch.Tensor]
    stored_dtypes: dict[str, torch.dtype]

    def sync_forward(self) -> None:
        """Copy ``block``'s (folded) weights into ``forward`` after the caller changed them."""
        if self.forward is not self.block:
            self.forward.load_state_dict(self.block.state_dict())

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The block's tensors as they are to be stored: each in its loaded dtype, on the CPU."""
        return {
            name: tensor.detach().to(device="cpu", dtype=self.stored_dtypes[name]).contiguous()
            for name, tensor in self.block.state_dict().items()
        }


def _work_copy(template: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """``template``'s structure holding ``state`` in float32 on ``device`` (float32 upcasts exactly)."""
    block = copy.deepcopy(template)
    state = {
        k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in state.items()
    }
    block.load_state_dict(state, strict=True, assign=True)
    return block.to(device)


def _check_finite(state: dict[str, torch.Tensor], index: int) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"block {index} {name} holds NaN or infinite values")


def _pool(
    stats: dict[str, LinearStats], module_inputs: dict[str, BlockArgs], workers: Workers, device: torch.device
) -> dict[str, BlockArgs]:
    """Every worker's batches into every worker's statistics; the module inputs of batch 0 (worker
    0's first) to all. Returns the module inputs.

    A worker's batches travel as three flat tensors: per statistic its batch count, then batch id,
    token count and search rows per batch (int64); the float64 sums; the search-token rows.
    """
    owners = list({id(s): name for name, s in stats.items()}.values())  # one entry per shared statistic
    header, sums, rows = [], [], []
    for name in owners:
        batches = stats[name].batches
        header.append(len(batches))
        for batch in sorted(batches):
            s1, s2, s_abs, count, search_rows = batches[batch]
            header += [batch, count, search_rows.shape[0]]
            sums += [s1, s2, s_abs]
            rows.append(search_rows.reshape(-1))
    packed = [torch.tensor(header, dtype=torch.int64, device=device), torch.cat(sums), torch.cat(rows)]
    for rank, (their_header, their_sums, their_rows) in enumerate(workers.everyones_tensors(packed)):
        if rank == workers.rank:
            continue
        values, at, sum_at, row_at = their_header.tolist(), 0, 0, 0
        for name in owners:
            n_in = stats[name].in_features
            n_batches, at = values[at], at + 1
            for _ in range(n_batches):
                batch, count, n_rows = values[at : at + 3]
                at += 3
                s1, s2, s_abs = their_sums[sum_at : sum_at + 3 * n_in].view(3, n_in)
                search_rows = their_rows[row_at : row_at + n_rows * n_in].view(n_rows, n_in)
                sum_at, row_at = sum_at + 3 * n_in, row_at + n_rows * n_in
                stats[name].batches[batch] = (s1, s2, s_abs, count, search_rows)
    if stats[owners[0]].gram is not None:
        _pool_grams([stats[name] for name in owners], workers, device)
    return moved(workers.broadcast(moved(module_inputs, "cpu")), device)


def _pool_grams(owners: list[LinearStats], workers: Workers, device: torch.device) -> None:
    """Every worker's Gram sums into one batch-order sum on every worker (``BatchOrderSum.pooled``).

    Per statistic, travels: its prefix length, whether the prefix added anything, its waiting
    batch count and ids (int64); its float64 prefix sum, if any; its waiting batches' products.
    """
    header, prefixes, waiting = [], [], []
    for stats in owners:
        gram = stats.gram
        given = sorted(b for b, value in gram.waiting.items() if value is not None)
        header += [gram.upto, gram.total is not None, len(given), *given]
        prefixes += [gram.total.reshape(-1)] if gram.total is not None else []
        waiting += [gram.waiting[b].reshape(-1) for b in given]
    empty = torch.zeros(0, device=device)
    packed = [
        torch.tensor(header, dtype=torch.int64, device=device),
        torch.cat(prefixes) if prefixes else empty.double(),
        torch.cat(waiting) if waiting else empty,
    ]
    everyone = workers.everyones_tensors(packed)
    per_stats: list[list[BatchOrderSum]] = [[] for _ in owners]
    for their_header, their_prefixes, their_waiting in everyone:
        values, at, prefix_at, waiting_at = their_header.tolist(), 0, 0, 0
        for i, stats in enumerate(owners):
            size, shape = stats.in_features**2, (stats.in_features, stats.in_features)
            part = BatchOrderSum()
            part.upto, has_total, n_waiting = values[at : at + 3]
            batches, at = values[at + 3 : at + 3 + n_waiting], at + 3 + n_waiting
            if has_total:
                part.total, prefix_at = their_prefixes[prefix_at : prefix_at + size].view(shape), prefix_at + size
            for batch in batches:
                part.waiting[batch], waiting_at = (
                    their_waiting[waiting_at : waiting_at + size].view(shape),
                    waiting_at + size,
                )
            per_stats[i].append(part)
    for stats, parts in zip(owners, per_stats):
        stats.gram = BatchOrderSum.pooled(parts)


def _search_rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The batch's search-token rows as rows of ``x``: the same, unless ``x`` holds only the tokens
    routed to an expert, whose search tokens are then the batch's that were routed to it."""
    routed = routed_tokens()
    if routed is None:
        return rows
    routed = routed.to(rows.device)
    return torch.searchsorted(routed, rows[torch.isin(rows, routed)])


class _InputRecorder:
    """Forward pre-hooks on one block's linears and on the submodules the module objective compares:
    per batch, each linear's input statistics; the submodules' inputs of the first batch."""

    def __init__(self, stats: dict[str, LinearStats]):
        self.stats = stats  # per linear name; linears fed the same tensor end up sharing one object
        self.module_inputs: dict[str, BlockArgs] = {}
        self.batch, self.rows = 0, torch.empty(0, dtype=torch.long)
        # Inputs seen in this batch and the linear that recorded each; holding them keeps the
        # identity checks sound.
        self.seen: list[tuple[torch.Tensor, str]] = []

    def attach(self, block: nn.Module, linears: dict[str, nn.Linear], modules: Sequence[str]) -> list[Any]:
        handles = [
            linear.register_forward_pre_hook(partial(self.record_linear, name)) for name, linear in linears.items()
        ]
        present = dict(block.named_modules())  # a hybrid decoder's blocks hold different modules
        handles += [
            present[name].register_forward_pre_hook(partial(self.keep_inputs, name), with_kwargs=True)
            for name in modules
            if name in present
        ]
        return handles

    def start_batch(self, batch: int, rows: torch.Tensor) -> None:
        self.batch, self.rows, self.seen = batch, rows, []

    def end_batch(self) -> None:
        """Gram sums of linears this batch never reached (experts no token was routed to) move on."""
        for stats in {id(s): s for s in self.stats.values()}.values():
            if stats.gram is not None and self.batch not in stats.batches:
                stats.gram.add(self.batch, None)

    def record_linear(self, name: str, module: nn.Module, args: tuple) -> None:
        """Linears fed the same tensor (q, k, v; gate, up) share one set of statistics."""
        x = args[0]
        shared = next((owner for seen, owner in self.seen if seen is x), None)
        if shared is None:
            self.seen.append((x, name))
            self.stats[name].add(x, _search_rows_of(x, self.rows), self.batch)
        else:
            self.stats[name] = self.stats[shared]

    def keep_inputs(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.module_inputs.setdefault(name, (args, kwargs))


def walk_blocks(
    layout: DecoderLayout,
    inputs: BlockInputs,
    *,
    search_indices: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    record_modules: Sequence[str] = (),
    block_state: BlockState | None = None,
    start: int = 0,
    workers: Workers = Workers(),
    every_token: bool = True,
    gram: bool = False,
) -> Iterator[BlockVisit]:
    """Visit the blocks from ``start`` on, one at a time, with the input statistics of their linears.

    Each block is loaded from ``block_state`` (the model's own blocks by default), copied to
    ``device`` in float32 for the caller to quantize, and run in ``compute_dtype``. ``inputs``
    holds the hidden states entering block ``start`` for the batches this worker runs; the
    statistics pool every worker's batches. Only the visited block is in memory. With ``gram``
    the statistics keep each linear input's Gram matrix too (in^2 float64 numbers per input).
    """
    device = torch.device(device)
    block_state = block_state or in_memory_state(layout)
    inputs = inputs.to(device)
    hidden = inputs.hidden
    starts = torch.tensor([0] + inputs.batch_tokens).cumsum(0)
    rows_per_batch = [
        search_indices[(search_indices >= lo) & (search_indices < hi)] - lo
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist())
    ]

    for index in range(start, len(layout.blocks)):
        state = block_state(index)
        _check_finite(state, index)
        block = _work_copy(layout.blocks[index], state, device)
        forward = block if compute_dtype == torch.float32 else copy.deepcopy(block).to(compute_dtype)
        # With ``every_token``, every calibration token through every expert: each expert's
        # statistics from all tokens, the block's output from the routed experts only.
        set_every_token(forward, every_token)
        stored_dtypes = {name: tensor.dtype for name, tensor in state.items()}
        del state
        linears = block_linears(forward)
        stats = {name: LinearStats.empty(linear.in_features, device, gram) for name, linear in linears.items()}
        recorder = _InputRecorder(stats)
        handles = recorder.attach(forward, linears, record_modules)
        outputs = []
        try:
            with torch.no_grad():
                for b, h, (args, kwargs) in zip(inputs.batches, hidden, inputs.args[index]):
                    recorder.start_batch(b, rows_per_batch[b])
                    out = forward(h, *args, **kwargs)
                    outputs.append(hidden_of(out))
                    recorder.end_batch()
        finally:
            for handle in handles:
                handle.remove()
            recorder.seen = []
        module_inputs = recorder.module_inputs
        set_every_token(forward, False)  # the module objective runs the routed experts only
        if workers.world > 1:
            module_inputs = _pool(stats, module_inputs, workers, device)
        yield BlockVisit(index, block, forward, stats, module_inputs, outputs, stored_dtypes)
        hidden = outputs
