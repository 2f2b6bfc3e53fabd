"""The windows a model is scored on.

``stream`` tokenizes the corpus once and cuts non-overlapping windows; ``samples`` draws standalone
texts (paragraphs) and truncates each. Either way every window is BOS-led when the tokenizer puts
BOS before plain text, so the model sees what it was trained to see.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from awqkit.data.tokens import bos_to_prepend, cut_windows, tokenize_text

log = logging.getLogger("awqkit")


MODES = ("stream", "samples")


@dataclass(frozen=True)
class Windows:
    """Right-padded token windows; row i holds ``lengths[i]`` real tokens (BOS included)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    bos: bool

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def predicted(self) -> np.ndarray:
        """Tokens each window predicts: all but its first."""
        return (self.lengths - 1).numpy()

    def digest(self) -> str:
        """sha256 of the real tokens, so two runs with equal digests scored the same text."""
        h = hashlib.sha256(self.lengths.numpy().astype("<i8").tobytes())
        for row, length in zip(self.ids, self.lengths.tolist()):
            h.update(row[:length].numpy().astype("<i8").tobytes())
        return h.hexdigest()


def _stream_ids(tokenizer: Any, text: str, min_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text``, or of a paragraph-aligned prefix holding at least ``min_tokens``.

    Tokenizing a multi-MB corpus takes seconds; a few test windows need only its start. Cutting
    at a blank line keeps the prefix's ids equal to the full text's except near the cut.
    """
    if not min_tokens:
        return tokenize_text(tokenizer, text)
    chars = 4 * min_tokens  # English text runs ~4 characters per token
    while True:
        cut = text.find("\n\n", chars)
        if cut == -1:
            return tokenize_text(tokenizer, text)
        ids = tokenize_text(tokenizer, text[:cut])
        if ids.numel() >= min_tokens:
            return ids
        chars *= 2


def eval_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Stream-mode windows: the text tokenized once, cut into non-overlapping BOS-led windows."""
    bos = bos_to_prepend(tokenizer)
    body = seq_len - (bos is not None)
    # One spare window of text, so the windows kept never reach the prefix's cut.
    min_tokens = (max_windows + 1) * body if max_windows else None
    windows = cut_windows(_stream_ids(tokenizer, text, min_tokens), seq_len, bos)
    if len(windows) == 0:
        raise ValueError(f"text too short for one window of {seq_len} tokens")
    return windows[:max_windows] if max_windows else windows


def stream_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None) -> Windows:
    ids = eval_windows(tokenizer, text, seq_len, max_windows)
    return Windows(ids, torch.full((len(ids),), seq_len), bos_to_prepend(tokenizer) is not None)


def sample_windows(tokenizer: Any, text: str, n_samples: int, seq_len: int, seed: int) -> Windows:
    """``n_samples`` paragraphs (texts between blank lines) in seeded random order, one per window.

    Each is tokenized on its own and truncated to ``seq_len`` tokens, BOS included. Paragraphs too
    short to predict a single token are skipped, so the next ones in the drawn order fill in.
    """
    texts = [t.strip() for t in text.split("\n\n") if t.strip()]
    bos = bos_to_prepend(tokenizer)
    lead = [] if bos is None else [bos]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[int]] = []
    for start in range(0, len(order), n_samples):
        picked = [texts[i] for i in order[start : start + n_samples]]
        for ids in tokenizer(picked, add_special_tokens=False)["input_ids"]:
            row = (lead + ids)[:seq_len]
            if len(row) >= 2:
                rows.append(row)
        if len(rows) >= n_samples:
            break
    if not rows:
        raise ValueError("no paragraph is long enough to predict a token")
    if len(rows) < n_samples:
        log.warning("only %d usable paragraphs, fewer than the %d samples asked for", len(rows), n_samples)
    rows = rows[:n_samples]
    lengths = torch.tensor([len(r) for r in rows])
    # Padding id 0 is never read: causal attention keeps real positions from seeing later pads,
    # and padded positions are masked out of the loss.
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return Windows(ids, lengths, bos is not None)
