"""How good a model is: token windows, mean next-token NLL per window, and paired statistics.

Two ways to cut text into windows: ``stream`` tokenizes the corpus once and cuts non-overlapping
windows; ``samples`` draws standalone texts (paragraphs) and truncates each. Either way every
window is BOS-led when the tokenizer puts BOS before plain text, so the model sees what it was
trained to see. The statistics at the end are pure functions of per-window NLLs.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from awqkit.calibration import bos_to_prepend, cut_windows, tokenize_text

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


def window_nll(
    model: Any,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean NLL of each window's predicted tokens (all but the first), computed in the model's dtype.

    With ``lengths``, row i is right-padded after ``lengths[i]`` tokens; each batch is trimmed to
    its longest row, so order windows by length to waste little compute on padding.
    """
    lengths = torch.full((len(windows),), windows.shape[1]) if lengths is None else lengths
    nll = []
    with torch.inference_mode():
        for batch, batch_lengths in tqdm(
            zip(windows.split(batch_size), lengths.split(batch_size)),
            total=-(-len(windows) // batch_size),
            desc="eval",
            disable=not progress,
        ):
            batch = batch[:, : int(batch_lengths.max())]
            logits = model(batch).logits[:, :-1]
            targets = batch[:, 1:]
            # Row by row: a float32 copy of a whole batch's logits can take gigabytes (Gemma: 262k vocab).
            losses = torch.stack(
                [torch.nn.functional.cross_entropy(row.float(), t, reduction="none") for row, t in zip(logits, targets)]
            ).double()
            mask = torch.arange(targets.shape[1]) < (batch_lengths - 1)[:, None]
            nll.append((losses * mask).sum(dim=1) / mask.sum(dim=1))
    return torch.cat(nll)


def perplexity(window_nlls: torch.Tensor | np.ndarray, tokens: np.ndarray | None = None) -> float:
    """exp of the mean token NLL: windows weighted by the tokens they predict (equal when omitted)."""
    nll = np.asarray(window_nlls, dtype=np.float64)
    return math.exp(weighted_mean(nll, np.ones_like(nll) if tokens is None else tokens))


# Statistics over per-window NLLs. Windows are the resampling unit: tokens within a window are
# correlated, windows far less so. No I/O below.


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sum(values * weights) / np.sum(weights))


def bootstrap_means(
    values: np.ndarray, weights: np.ndarray, n_resamples: int = 2000, seed: int = 42
) -> np.ndarray:
    """Weighted means of ``n_resamples`` resamples of the windows, drawn with replacement."""
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_resamples)
    per_block = max(1, 2**22 // n)  # bounds the index matrix to ~32 MB
    for start in range(0, n_resamples, per_block):
        idx = rng.integers(0, n, size=(min(per_block, n_resamples - start), n))
        w = weights[idx]
        means[start : start + len(idx)] = np.sum(values[idx] * w, axis=1) / np.sum(w, axis=1)
    return means


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def win_share(nll: np.ndarray, reference: np.ndarray) -> float:
    """Share of windows where ``nll`` is lower than ``reference``; ties count half."""
    nll, reference = np.asarray(nll), np.asarray(reference)
    return float((np.sum(nll < reference) + 0.5 * np.sum(nll == reference)) / len(nll))


@dataclass(frozen=True)
class PairedDifference:
    """Model minus reference, over the same windows."""

    mean_nll_diff: float
    ci: tuple[float, float]
    win_share: float


def paired_difference(
    nll: np.ndarray, reference: np.ndarray, weights: np.ndarray, n_resamples: int = 2000, seed: int = 42
) -> PairedDifference:
    """Mean NLL difference with a paired bootstrap 95% CI: both models resampled on the same windows."""
    diff = np.asarray(nll, np.float64) - np.asarray(reference, np.float64)
    ci = percentile_interval(bootstrap_means(diff, weights, n_resamples, seed))
    return PairedDifference(weighted_mean(diff, weights), ci, win_share(nll, reference))


def perplexity_interval(
    nll: np.ndarray, weights: np.ndarray, n_resamples: int = 2000, seed: int = 42
) -> tuple[float, float]:
    """95% CI of perplexity: exp of the bootstrap interval of the mean NLL."""
    low, high = percentile_interval(bootstrap_means(nll, weights, n_resamples, seed))
    return math.exp(low), math.exp(high)
