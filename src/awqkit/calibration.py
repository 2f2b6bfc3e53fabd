"""Calibration: which token windows, and one block's input statistics while walking the blocks.

The walk runs the decoder one block at a time: block i sees the float outputs of block i-1.
Per linear it keeps only float64 running sums of x and x^2 and a pre-drawn token subsample for
the search, so memory holds one block's statistics plus the hidden states of the windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from awqkit.architectures import DecoderLayout, block_linears


def bos_to_prepend(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one before plain text (Gemma does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if len(with_special) > len(plain) and with_special[0] == bos else None


def paragraph_pieces(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut after roughly ``chunk_chars`` characters, at paragraph breaks."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + chunk_chars)
        end = len(text) if end == -1 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_text(tokenizer: Any, text: str, chunk_chars: int = 1 << 18) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, one paragraph-aligned chunk at a time."""
    ids = [torch.tensor(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=torch.long)
           for piece in paragraph_pieces(text, chunk_chars)]
    return torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)


def sample_text_ids(
    tokenizer: Any, text: str, min_tokens: int, seed: int, chunk_chars: int = 1 << 16
) -> torch.Tensor:
    """Token ids of paragraph-aligned chunks drawn in seeded order until ``min_tokens`` are reached.

    Spares tokenizing a whole large corpus (18 MB of Python docs take ~20 s) when calibration
    needs a small, random part of it.
    """
    pieces = paragraph_pieces(text, chunk_chars)
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    ids, total = [], 0
    for index in order:
        ids.append(tokenize_text(tokenizer, pieces[index]))
        total += ids[-1].numel()
        if total >= min_tokens:
            break
    return torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)


def cut_windows(ids: torch.Tensor, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """All non-overlapping windows of ``seq_len`` tokens, each led by BOS when given."""
    body = seq_len - (bos_id is not None)
    if body < 1:
        raise ValueError(f"seq-len {seq_len} leaves no room for text")
    n = ids.numel() // body
    windows = ids[: n * body].view(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=ids.dtype), windows], dim=1)
    return windows


def calibration_windows(
    ids: torch.Tensor, n_windows: int, seq_len: int, seed: int, bos_id: int | None
) -> torch.Tensor:
    """``n_windows`` windows drawn without replacement by a seeded generator."""
    windows = cut_windows(ids, seq_len, bos_id)
    if len(windows) < n_windows:
        raise ValueError(
            f"calibration text too short: {ids.numel()} tokens make {len(windows)} windows of "
            f"{seq_len}, {n_windows} needed"
        )
    generator = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(len(windows), generator=generator)[:n_windows]]


def search_token_indices(n_tokens: int, max_tokens: int, seed: int) -> torch.Tensor:
    """Sorted flat indices of the tokens the alpha search measures its error on."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=generator)[:max_tokens].sort().values


@dataclass
class LinearStats:
    """Running statistics of one linear's input over all calibration tokens."""

    sum_x: torch.Tensor
    sum_x2: torch.Tensor
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, in_features: int) -> "LinearStats":
        zeros = torch.zeros(in_features, dtype=torch.float64)
        return cls(zeros, zeros.clone())

    def add(self, x: torch.Tensor, sample_rows: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        x64 = x.double()
        self.sum_x += x64.sum(dim=0)
        self.sum_x2 += x64.square().sum(dim=0)
        self.count += x.shape[0]
        self.samples.append(x[sample_rows])

    def mean(self) -> torch.Tensor:
        return self.sum_x / self.count

    def mean_square(self) -> torch.Tensor:
        """The AWQ salience E[x_j^2]."""
        return self.sum_x2 / self.count

    def search_tokens(self) -> torch.Tensor:
        return torch.cat(self.samples)


BlockArgs = tuple[tuple, dict]  # positional args after hidden_states, and keyword args


def capture_block_inputs(
    layout: DecoderLayout, windows: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[list[BlockArgs]]]:
    """Hidden states entering block 0, and the arguments each block receives, per batch.

    Arguments are captured per block, not once at block 0: models that alternate attention types
    (Gemma3: sliding vs full, with different rotary bases and masks) pass each block its own.
    The blocks are replaced by pass-throughs, so this costs one embedding lookup per batch.
    """
    records: list[BlockArgs] = []
    first_inputs: list[torch.Tensor] = []

    def pass_through(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first_inputs.append(hidden)
            records.append((args[1:], kwargs))
            return hidden

        return forward

    per_block: list[list[BlockArgs]] = [[] for _ in layout.blocks]
    for index, block in enumerate(layout.blocks):
        block.forward = pass_through(index)
    try:
        embed = layout.decoder.get_input_embeddings()
        with torch.no_grad():
            for batch in windows.split(batch_size):
                records.clear()
                layout.decoder(inputs_embeds=embed(batch).to(dtype), use_cache=False)
                for index, args in enumerate(records):
                    per_block[index].append(args)
    finally:
        for block in layout.blocks:
            del block.forward
    return first_inputs, per_block


@dataclass
class BlockVisit:
    index: int
    block: nn.Module
    stats: dict[str, LinearStats]  # per linear name; linears fed the same tensor share one object
    # (args, kwargs) that each requested submodule received in the first calibration batch
    module_inputs: dict[str, BlockArgs]


def walk_blocks(
    layout: DecoderLayout,
    windows: torch.Tensor,
    *,
    search_indices: torch.Tensor,
    batch_size: int = 8,
    compute_dtype: torch.dtype = torch.float32,
    record_modules: Sequence[str] = (),
) -> Iterator[BlockVisit]:
    """Visit the blocks one at a time with the input statistics of their linears.

    Each block runs in ``compute_dtype`` while it is visited and goes back to its own dtype when
    the caller resumes the walk, so weights the caller writes are rounded to the model's dtype.
    The next block's inputs are this block's outputs computed before the caller touched it.
    """
    hidden, block_args = capture_block_inputs(layout, windows, batch_size, compute_dtype)
    tokens_per_batch = [h.shape[0] * h.shape[1] for h in hidden]
    starts = torch.tensor([0] + tokens_per_batch).cumsum(0)
    rows_per_batch = [
        search_indices[(search_indices >= lo) & (search_indices < hi)] - lo
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist())
    ]

    for index, block in enumerate(layout.blocks):
        own_dtype = next(block.parameters()).dtype
        block.to(compute_dtype)
        linears = block_linears(block)
        stats = {name: LinearStats.empty(linear.in_features) for name, linear in linears.items()}
        module_inputs: dict[str, BlockArgs] = {}
        batch: dict[str, Any] = {"rows": rows_per_batch[0], "seen": []}

        def record(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                # Linears fed the same tensor (q, k, v; gate, up) share one set of statistics.
                # Holding the tensors seen in this batch keeps identity checks sound.
                x = args[0]
                shared = next((owner for seen, owner in batch["seen"] if seen is x), None)
                if shared is None:
                    batch["seen"].append((x, name))
                    stats[name].add(x, batch["rows"])
                else:
                    stats[name] = stats[shared]

            return hook

        def keep_inputs(name: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                module_inputs.setdefault(name, (args, kwargs))

            return hook

        handles = [linear.register_forward_pre_hook(record(name)) for name, linear in linears.items()]
        handles += [
            block.get_submodule(name).register_forward_pre_hook(keep_inputs(name), with_kwargs=True)
            for name in record_modules
        ]
        outputs = []
        try:
            with torch.no_grad():
                for b, (h, (args, kwargs)) in enumerate(zip(hidden, block_args[index])):
                    batch["rows"], batch["seen"] = rows_per_batch[b], []
                    out = block(h, *args, **kwargs)
                    outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for handle in handles:
                handle.remove()
            batch["seen"] = []
        yield BlockVisit(index, block, stats, module_inputs)
        block.to(own_dtype)
        hidden = outputs
