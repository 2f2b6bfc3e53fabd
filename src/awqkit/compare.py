"""``awqkit eval``: several models scored on the same token windows, with paired confidence intervals.

Windows come from the first model's tokenizer; a model whose tokenizer disagrees is refused,
since comparing NLLs over different tokens means nothing. One model is in memory at a time.
Per-window NLLs go to a cache file after every batch, keyed by the model folder's weights, the
dtype asked for and the windows, so a crashed run resumes where it stopped and a model already
scored on these windows is not loaded again. A cache file is trusted only when it passes every
check on load; any other file is treated as no cache and overwritten.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from awqkit.calibration import bos_to_prepend, tokenize_text
from awqkit.checkpoint import load_checked_model
from awqkit.evaluation import (
    MODES,
    Windows,
    paired_difference,
    perplexity_interval,
    sample_windows,
    stream_windows,
    weighted_mean,
    window_nll,
)
from awqkit.report import markdown_table
from awqkit.runtime import library_versions
from awqkit.shipped import cache_dir

log = logging.getLogger("awqkit")

TOKENIZER_PROBE_CHARS = 20_000
# Version of the cache file's layout; a file of any other version is scored again.
CACHE_FORMAT = 2


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
        from awqkit.checkpoint import DTYPES

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


def weights_digest(model: str) -> str | None:
    """sha256 over a local model folder's config.json and *.safetensors; None when not a folder."""
    folder = Path(model).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for path in [folder / "config.json", *files]:
        if path.is_file():
            with open(path, "rb") as handle:
                h.update(f"{path.name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}\n".encode())
    return h.hexdigest()


def saved_dtype(model: str) -> str | None:
    """The dtype a local folder's config.json says its weights are in."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text())
    return saved.get("dtype") or saved.get("torch_dtype")


def _cache_path(root: Path, digest: str, dtype: str, dataset: str, windows: Windows) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset).name)[:40]
    return root / f"{digest[:16]}-{dtype}-{slug}-{windows.digest()[:16]}.npz"


@dataclass
class CachedNLL:
    """Per-window NLLs of one model on one dataset, filled in as windows are scored.

    ``scored`` marks the windows done; their NLLs are finite and non-negative, the others 0.
    ``dtype`` is the dtype the scored windows ran in, None before the first.
    """

    nll: np.ndarray
    scored: np.ndarray
    dtype: str | None

    @classmethod
    def empty(cls, n: int) -> CachedNLL:
        return cls(np.zeros(n), np.zeros(n, dtype=bool), None)

    @property
    def complete(self) -> bool:
        return self.dtype is not None and bool(self.scored.all())


def _read_cache(path: Path, n: int) -> CachedNLL:
    """A cache file's contents for ``n`` windows; ValueError saying why when they cannot be trusted."""
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded:
            fields = {key: loaded[key] for key in loaded.files}
    # What numpy and zipfile raise on zero-byte, junk and truncated files.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"unreadable: {error}") from None
    missing = {"format", "versions", "dtype", "nll", "scored"} - fields.keys()
    if missing:
        raise ValueError(f"lacks {', '.join(sorted(missing))}")
    if fields["format"].shape != () or fields["format"].item() != CACHE_FORMAT:
        raise ValueError(f"format {fields['format']!r}, not {CACHE_FORMAT}")
    if fields["versions"].dtype.kind != "U" or json.loads(fields["versions"].item()) != library_versions():
        raise ValueError(f"scored by other library versions ({fields['versions']})")
    nll, scored, dtype = fields["nll"], fields["scored"], fields["dtype"]
    if nll.shape != (n,) or nll.dtype != np.float64 or scored.shape != (n,) or scored.dtype != bool:
        raise ValueError(f"nll {nll.dtype} {nll.shape} and scored {scored.dtype} {scored.shape}, not for {n} windows")
    if not (np.isfinite(nll).all() and (nll >= 0).all()):
        raise ValueError("NLLs that are negative, NaN or infinite")
    if dtype.dtype.kind != "U" or dtype.shape != () or not isinstance(getattr(torch, dtype.item(), None), torch.dtype):
        raise ValueError(f"no torch dtype: {dtype!r}")
    return CachedNLL(nll, scored, dtype.item())


def _load_cache(path: Path | None, n: int) -> CachedNLL:
    """What the cache file holds for ``n`` windows; an empty cache when there is no valid file."""
    if path is None or not path.exists():
        return CachedNLL.empty(n)
    try:
        return _read_cache(path, n)
    except ValueError as error:
        log.warning("eval cache %s ignored and rewritten: %s", path, error)
        return CachedNLL.empty(n)


def _save_cache(path: Path, cache: CachedNLL) -> None:
    # Write, fsync, rename: a crash or power loss mid-write leaves the previous cache, never a
    # truncated one. The folder is synced too, so the rename itself is on disk.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                format=np.array(CACHE_FORMAT),
                versions=np.array(json.dumps(library_versions())),
                dtype=np.array(cache.dtype),
                nll=cache.nll,
                scored=cache.scored,
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_seq_len(model_name: str, seq_len: int) -> None:
    """Refuse windows longer than the model's position embeddings reach: their NLLs mean nothing."""
    from transformers import AutoConfig

    from awqkit.checkpoint import one_line_load_error

    try:
        config = AutoConfig.from_pretrained(model_name).get_text_config()
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
    path: Path | None,
    batch_size: int,
    names: tuple[str, str],
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Score the windows ``cache`` lacks, a batch at a time, saving it after each batch.

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
        if path is not None:
            _save_cache(path, cache)
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
    paths = {
        name: _cache_path(config.cache_dir, digest, config.dtype, name, w) if digest else None
        for name, w in windows.items()
    }
    cached = {name: _load_cache(paths[name], len(w)) for name, w in windows.items()}
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
            model, w, start, paths[name], config.batch_size, (model_name, name), f"{label} {name}", progress
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
    from awqkit.checkpoint import load_tokenizer
    from awqkit.corpora import load_corpus
    from awqkit.shipped import resolve_shipped

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


def _dtype_cell(model: dict) -> str:
    saved = model["saved_dtype"]
    return model["dtype"] if saved in (None, model["dtype"]) else f"{model['dtype']} (saved {saved})"


def _result_cells(index: int, model: dict, result: dict) -> list[str]:
    cells = [
        f"#{index + 1} {model['name']}",
        _dtype_cell(model),
        f"{result['ppl']:.3f}",
        "{:.3f} - {:.3f}".format(*result["ppl_ci"]),
    ]
    if "vs_first" not in result:
        return cells + ["", "", ""]
    vs = result["vs_first"]
    return cells + [f"{vs['mean_nll_diff']:+.4f}", "[{:+.4f}, {:+.4f}]".format(*vs["ci"]), f"{vs['win_share']:.1%}"]


def format_table(report: dict) -> str:
    """The report as a Markdown table, one row per dataset and model."""
    config, models = report["config"], report["models"]
    headers = ["dataset", "bos", "windows", "tokens", "model", "dtype", "ppl", "ppl 95% CI"]
    headers += ["dNLL vs #1", "dNLL 95% CI", "wins vs #1"]
    rows = []
    for name, data in report["datasets"].items():
        dataset_cells = [name, "yes" if data["bos"] else "no", str(data["windows"]), str(data["tokens"])]
        for index, (model, result) in enumerate(zip(models, data["results"])):
            # The dataset columns are filled on its first row only, so each dataset reads as a block.
            rows.append((dataset_cells if index == 0 else [""] * 4) + _result_cells(index, model, result))
    limit = f", first {config['max_windows']} windows" if config["max_windows"] else ""
    samples = f", {config['n_samples']} samples, seed {config['seed']}" if config["mode"] == "samples" else ""
    head = (
        f"mode {config['mode']}, seq-len {config['seq_len']}{samples}{limit}; "
        "dNLL = mean token NLL of the model minus #1's, paired bootstrap 95% CI over windows"
    )
    return head + "\n\n" + markdown_table(headers, rows)


def plot_report(report: dict, path: str | Path) -> None:
    """A PNG with one panel per dataset: each model's perplexity and its bootstrap 95% CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = report["datasets"]
    # An explicit Agg canvas, not pyplot: no display needed and no global backend switched.
    figure = Figure(figsize=(1.5 + 3.5 * len(datasets), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    labels = [f"#{i + 1} {Path(m['name']).name}\n{m['dtype']}" for i, m in enumerate(report["models"])]
    for ax, (name, data) in zip(axes, datasets.items()):
        ppl = np.array([r["ppl"] for r in data["results"]])
        low, high = np.array([r["ppl_ci"] for r in data["results"]]).T
        x = np.arange(len(ppl))
        ax.bar(x, ppl, yerr=[ppl - low, high - ppl], capsize=5, color=[f"C{i % 10}" for i in x])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{name} ({data['windows']} windows)")
        ax.set_ylabel("perplexity (95% CI)")
    figure.savefig(path, dpi=120)
