"""``awqkit eval``: several models scored on the same token windows, with paired confidence intervals.

Windows come from the first model's tokenizer; a model whose tokenizer disagrees is refused,
since comparing NLLs over different tokens means nothing. One model is in memory at a time.
Per-window NLLs go to a cache (awqkit.eval.cache) after every batch, so a crashed run resumes
where it stopped and a model already scored on these windows is not loaded again. The table and
the plot are awqkit.eval.report's.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from awqkit.data.corpora import load_corpus
from awqkit.data.tokens import bos_to_prepend, tokenize_text
from awqkit.eval.cache import CachedNLL, CacheKey, load_cache, save_cache, weights_digest
from awqkit.eval.stats import paired_difference, perplexity_interval, weighted_mean
from awqkit.eval.windows import MODES, Windows, sample_windows, stream_windows
from awqkit.model.load import DTYPES, load_checked_model, load_tokenizer, one_line_load_error
from awqkit.model.shipped import cache_dir, resolve_shipped

log = logging.getLogger("awqkit")


TOKENIZER_PROBE_CHARS = 20_000


def default_cache_dir() -> Path:
    return cache_dir() / "eval"


@dataclass(frozen=True)
class EvalConfig:
    datasets: tuple[str, ...] = ("fortunes", "foldoc")
    mode: str = "stream"
    seq_len: int = 2048
    n_samples: int = 2000
    seed: int = 42
    dtype: str = "auto"
    max_windows: int | None = None
    batch_size: int = 4
    n_resamples: int = 2000
    cache_dir: Path | None = field(default_factory=default_cache_dir)

    def validate(self) -> None:

        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if not self.datasets:
            raise ValueError("no datasets given")
        if self.seq_len < 2:
            raise ValueError(f"seq-len must be >= 2 (one token predicts the next), got {self.seq_len}")
        for name in ("n_samples", "batch_size", "n_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max-windows must be >= 1, got {self.max_windows}")
        # Found now, not when the first batch's NLLs are saved.
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise NotADirectoryError(f"cache folder is a file: {self.cache_dir}")


def build_windows(tokenizer: Any, text: str, config: EvalConfig) -> Windows:
    if config.mode == "stream":
        return stream_windows(tokenizer, text, config.seq_len, config.max_windows)
    n_samples = min(config.n_samples, config.max_windows or config.n_samples)
    return sample_windows(tokenizer, text, n_samples, config.seq_len, config.seed)


def check_same_tokenizer(reference: Any, other: Any, texts: Iterable[str], names: tuple[str, str]) -> None:
    """Refuse ``other`` unless it has the reference's vocabulary, BOS rule and ids on each text's start."""
    probes = [text[:TOKENIZER_PROBE_CHARS] for text in texts]
    same = (
        reference.get_vocab() == other.get_vocab()
        and bos_to_prepend(reference) == bos_to_prepend(other)
        and all(torch.equal(tokenize_text(reference, p), tokenize_text(other, p)) for p in probes)
    )
    if not same:
        raise ValueError(
            f"models with different tokenizers: {names[1]} does not tokenize like {names[0]}; "
            "perplexities are comparable only over the same tokens, so evaluate them separately"
        )


def saved_dtype(model: str) -> str | None:
    """The dtype a local folder's config.json says its weights are in."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text())
    return saved.get("dtype") or saved.get("torch_dtype")


def check_seq_len(model_name: str, seq_len: int) -> None:
    """Refuse windows longer than the model's position embeddings reach: their NLLs mean nothing."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name, trust_remote_code=False).get_text_config()
    except OSError as error:
        raise one_line_load_error(model_name, error) from None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq-len {seq_len} is beyond {model_name}'s max_position_embeddings {limit}")


@dataclass
class Scored:
    """One model's per-window NLLs per dataset, and the dtype its forward passes ran in."""

    dtype: str
    saved_dtype: str | None
    nll: dict[str, np.ndarray]


def _score_windows(
    model: Any,
    windows: Windows,
    cache: CachedNLL,
    store: tuple[Path, CacheKey] | None,
    batch_size: int,
    names: tuple[str, str],
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Score the windows ``cache`` lacks, a batch at a time, saving it after each batch to ``store``
    (a cache file and what it holds).

    ``names`` are the model's and the dataset's, for the error a non-finite NLL raises: a NaN or
    inf would make the perplexity and every interval meaningless.
    """
    # Longest first, so each batch is trimmed to similar lengths (samples mode).
    order = torch.argsort(windows.lengths, descending=True, stable=True)
    todo = order[torch.from_numpy(~cache.scored[order.numpy()])]
    bar = tqdm(total=len(windows), initial=len(windows) - len(todo), desc=desc, disable=not progress)
    for batch in todo.split(batch_size):
        scored = window_nll(model, windows.ids[batch], batch_size, lengths=windows.lengths[batch]).numpy()
        if not np.isfinite(scored).all():
            window = int(batch.numpy()[~np.isfinite(scored)][0])
            raise ValueError(
                f"{names[0]} gives a non-finite NLL on {names[1]} (window {window}): "
                "its weights or activations hold NaN or inf"
            )
        cache.nll[batch.numpy()], cache.scored[batch.numpy()] = scored, True
        if store is not None:
            save_cache(*store, cache)
        bar.update(len(batch))
    bar.close()
    return cache.nll


def score_model(
    model_name: str, windows: dict[str, Windows], config: EvalConfig, label: str, progress: bool = True
) -> Scored:
    """Per-window NLLs of one model on every dataset, resuming from and saving to the cache."""
    digest = weights_digest(model_name) if config.cache_dir is not None else None
    if config.cache_dir is not None and digest is None:
        log.info("%s is not a local folder with safetensors: its NLLs are not cached", model_name)
    stores: dict[str, tuple[Path, CacheKey] | None] = dict.fromkeys(windows)
    cached = {name: CachedNLL.empty(len(w)) for name, w in windows.items()}
    if config.cache_dir is not None and digest is not None:
        for name, w in windows.items():
            key = CacheKey(digest, config.dtype, w.digest())
            stores[name] = (key.file(config.cache_dir, name), key)
            cached[name] = load_cache(*stores[name], len(w))
    dtypes = {cache.dtype for cache in cached.values()}
    if all(cache.complete for cache in cached.values()) and len(dtypes) == 1:
        log.info("%s: every window's NLL is cached", label)
        return Scored(dtypes.pop(), saved_dtype(model_name), {name: cache.nll for name, cache in cached.items()})

    log.info("%s: loading %s (dtype %s)", label, model_name, config.dtype)
    model = load_checked_model(model_name, config.dtype)
    dtype = str(model.dtype).removeprefix("torch.")
    scores = {}
    for name, w in windows.items():
        start = cached[name] if cached[name].dtype == dtype else CachedNLL.empty(len(w))
        start.dtype = dtype
        scores[name] = _score_windows(
            model, w, start, stores[name], config.batch_size, (model_name, name), f"{label} {name}", progress
        )
    # Free this model before the caller loads the next one; HF modules hold reference cycles.
    del model
    gc.collect()
    return Scored(dtype, saved_dtype(model_name), scores)


def summarize(models: Sequence[str], scored: Sequence[Scored], windows: dict[str, Windows], config: EvalConfig) -> dict:
    """The JSON report: per dataset each model's perplexity, and each model against the first."""
    datasets = {}
    for name, w in windows.items():
        tokens = w.predicted.astype(np.float64)
        reference = scored[0].nll[name]
        results = []
        for index, (model, score) in enumerate(zip(models, scored)):
            nll = score.nll[name]
            mean = weighted_mean(nll, tokens)
            entry: dict[str, Any] = {
                "model": model,
                "dtype": score.dtype,
                "mean_nll": mean,
                "ppl": float(np.exp(mean)),
                "ppl_ci": list(perplexity_interval(nll, tokens, config.n_resamples, config.seed)),
                "window_nll": nll.tolist(),
            }
            if index:
                diff = paired_difference(nll, reference, tokens, config.n_resamples, config.seed)
                entry["vs_first"] = {**asdict(diff), "ci": list(diff.ci)}
            results.append(entry)
        datasets[name] = {
            "bos": w.bos,
            "windows": len(w),
            "tokens": int(tokens.sum()),
            "tokens_per_window": w.predicted.tolist(),
            "windows_sha256": w.digest(),
            "results": results,
        }
    run = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "config": run,
        "models": [{"name": m, "dtype": s.dtype, "saved_dtype": s.saved_dtype} for m, s in zip(models, scored)],
        "datasets": datasets,
    }


def evaluate(models: Sequence[str], config: EvalConfig, progress: bool = True) -> dict:
    """Score every model on every dataset's windows and return the report (see ``summarize``)."""

    config.validate()
    if not models:
        raise ValueError("no models given")
    models = [resolve_shipped(model) for model in models]
    # Every input problem surfaces before the first (slow) model load.
    texts = {name: load_corpus(name, split="test") for name in config.datasets}
    tokenizers = {model: load_tokenizer(model) for model in dict.fromkeys(models)}
    reference = tokenizers[models[0]]
    for model, tokenizer in tokenizers.items():
        if model != models[0]:
            check_same_tokenizer(reference, tokenizer, texts.values(), (models[0], model))
    for model in dict.fromkeys(models):
        check_seq_len(model, config.seq_len)
    windows = {name: build_windows(reference, text, config) for name, text in texts.items()}
    scored = [score_model(model, windows, config, f"#{i + 1}", progress) for i, model in enumerate(models)]
    return summarize(models, scored, windows, config)


log = logging.getLogger("awqkit")


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
