"""How good a model is: mean next-token NLL per window, and perplexity over windows."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from awqkit.calibration import bos_to_prepend, cut_windows, tokenize_text


def eval_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Stream-mode windows: the text tokenized once, cut into non-overlapping BOS-led windows."""
    windows = cut_windows(tokenize_text(tokenizer, text), seq_len, bos_to_prepend(tokenizer))
    if len(windows) == 0:
        raise ValueError(f"text too short for one window of {seq_len} tokens")
    return windows[:max_windows] if max_windows else windows


def window_nll(model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """Mean NLL of each window's predicted tokens (all but the first), computed in the model's dtype."""
    nll = []
    with torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc="eval", disable=not progress):
            logits = model(batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll.append(losses.double().mean(dim=1))
    return torch.cat(nll)


def perplexity(window_nlls: torch.Tensor) -> float:
    """exp of the mean token NLL; every window has the same number of predicted tokens."""
    return math.exp(window_nlls.mean().item())
