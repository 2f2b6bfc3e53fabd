"""Text to token windows: BOS-led, paragraph-aligned, seeded; the calibration windows of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from awqkit.config import QuantizeConfig
from awqkit.data.corpora import load_corpus


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
    ids = [
        torch.tensor(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=torch.long)
        for piece in paragraph_pieces(text, chunk_chars)
    ]
    return torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)


def sample_text_ids(tokenizer: Any, text: str, min_tokens: int, seed: int, chunk_chars: int = 1 << 16) -> torch.Tensor:
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


def calibration_windows(ids: torch.Tensor, n_windows: int, seq_len: int, seed: int, bos_id: int | None) -> torch.Tensor:
    """``n_windows`` windows drawn without replacement by a seeded generator."""
    windows = cut_windows(ids, seq_len, bos_id)
    if len(windows) < n_windows:
        raise ValueError(
            f"calibration text too short: {ids.numel()} tokens make {len(windows)} windows of "
            f"{seq_len}, {n_windows} needed"
        )
    generator = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(len(windows), generator=generator)[:n_windows]]


def load_calibration_tokens(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Windows saved as a 2-D integer .npy file, checked against the tokenizer's vocabulary."""
    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration token file not found: {path}")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a numpy .npy array ({str(error).splitlines()[0]})") from None
    if not isinstance(ids, np.ndarray):  # an .npz archive loads as a mapping of arrays
        raise ValueError(f"{path}: expected one .npy array of token ids, got an .npz archive")
    if ids.dtype.kind not in "iu":  # a float file would be silently truncated to ids
        raise ValueError(f"{path}: token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"{path}: expected a non-empty [n_windows, seq_len] array, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{path}: token ids outside the tokenizer's vocabulary (0..{vocab_size - 1})")
    return torch.from_numpy(ids.astype(np.int64))


def calibration_data(tokenizer: Any, config: QuantizeConfig) -> torch.Tensor:
    """The run's windows: from ``calib_tokens`` as given, or drawn from ``calib_data``'s text."""

    if config.calib_tokens is not None:
        return load_calibration_tokens(config.calib_tokens, len(tokenizer))
    text = load_corpus(config.calib_data, split="train")
    # Twice the tokens needed, so the seeded window draw still has a choice to make.
    ids = sample_text_ids(tokenizer, text, 2 * config.n_calib * config.seq_len, config.seed)
    return calibration_windows(ids, config.n_calib, config.seq_len, config.seed, bos_to_prepend(tokenizer))
