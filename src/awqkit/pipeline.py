"""The quantization run, end to end, as functions over one config dataclass."""

from __future__ import annotations

import logging
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from awqkit.architectures import find_decoder
from awqkit.calibration import (
    LinearStats,
    bos_to_prepend,
    calibration_windows,
    sample_text_ids,
    search_token_indices,
    walk_blocks,
)
from awqkit.corpora import load_corpus
from awqkit.quant import check_quant_args, quantize_groupwise
from awqkit.rounding import ROUNDINGS, make_rounding
from awqkit.search import search_alpha

log = logging.getLogger("awqkit")


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128
    n_grid: int = 20
    n_calib: int = 128
    seq_len: int = 512
    seed: int = 42
    rounding: str = "nearest"
    outlier_percent: float = 0.05
    max_search_tokens: int = 2048
    calib_data: str = "wikitext2"
    # Token windows [n, seq_len] saved with numpy (.npy), BOS included: used as-is instead of
    # drawing from calib_data, so other tools can calibrate on exactly the same tokens.
    calib_tokens: str | None = None
    batch_size: int = 8
    # fp32 matmuls are ~7x faster than bf16 on AVX2-only CPUs (measured: 110 vs 15 GFLOP/s);
    # bf16/fp16 weights upcast exactly, and the stored weights are rounded back to the model dtype.
    compute_dtype: str = "float32"

    def validate(self) -> None:
        check_quant_args(self.bits, self.group_size)
        for name in ("n_grid", "n_calib", "seq_len", "max_search_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if not 0.0 <= self.outlier_percent <= 1.0:
            raise ValueError(f"outlier-percent must be in [0, 1], got {self.outlier_percent}")


@dataclass
class LayerRecord:
    alpha: float
    error: float
    flips: int | None = None


@dataclass
class QuantizeResult:
    layers: dict[str, LayerRecord]
    scales: dict[str, torch.Tensor]  # module name -> the s applied: W_saved * s is on the grid
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: float = 0.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] += time.perf_counter() - start


def _timed_steps(steps: Iterator, timings: dict[str, float], stage: str) -> Iterator:
    while True:
        with timed(timings, stage):
            item = next(steps, None)
        if item is None:
            return
        yield item


def quantize_linear(
    linear: nn.Linear, stats: LinearStats, config: QuantizeConfig, timings: dict[str, float]
) -> tuple[LayerRecord, torch.Tensor]:
    """Search alpha for one linear, write Q(W*s)/s into it, return its record and s."""
    rounding = make_rounding(config.rounding, stats.mean(), config.outlier_percent)

    def timed_rounding(scales: torch.Tensor):
        strategy = rounding(scales)

        def apply(*args):
            with timed(timings, config.rounding):
                return strategy(*args)

        return apply

    w = linear.weight.data
    result = search_alpha(
        w,
        stats.search_tokens().to(w.dtype),
        stats.mean_square(),
        bits=config.bits,
        group_size=config.group_size,
        n_grid=config.n_grid,
        rounding=timed_rounding,
    )
    record = LayerRecord(alpha=result.alpha, error=result.error)
    if config.rounding != "nearest":
        nearest = quantize_groupwise(w * result.scales, config.bits, config.group_size)
        record.flips = int((nearest.q != result.quantized.q).sum())
    linear.weight.data.copy_(result.dequantized())
    return record, result.scales


def quantize_model(
    model: nn.Module, windows: torch.Tensor, config: QuantizeConfig, *, progress: bool = True
) -> QuantizeResult:
    """Quantize every linear of the decoder blocks of ``model`` in place (fake quantization)."""
    config.validate()
    layout = find_decoder(model)
    timings: dict[str, float] = defaultdict(float)
    search_indices = search_token_indices(windows.numel(), config.max_search_tokens, config.seed)
    steps = walk_blocks(
        layout,
        windows,
        search_indices=search_indices,
        batch_size=config.batch_size,
        compute_dtype=getattr(torch, config.compute_dtype),
    )
    layers: dict[str, LayerRecord] = {}
    scales: dict[str, torch.Tensor] = {}
    blocks_bar = tqdm(total=len(layout.blocks), desc="blocks", disable=not progress)
    for index, block, block_stats in _timed_steps(steps, timings, "calibration"):
        for name, linear in tqdm(
            [(n, m) for n, m in block.named_modules() if n in block_stats],
            desc=f"block {index}",
            leave=False,
            disable=not progress,
        ):
            with timed(timings, "search"):
                record, s = quantize_linear(linear, block_stats[name], config, timings)
            full_name = f"{layout.blocks_name}.{index}.{name}"
            layers[full_name] = record
            scales[full_name] = s.float().contiguous()
        blocks_bar.update()
    blocks_bar.close()
    if config.rounding in timings:
        timings["search"] -= timings[config.rounding]
    return QuantizeResult(layers, scales, dict(timings), peak_rss_gib())


def load_calibration_tokens(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Windows saved as a 2-D integer .npy file, checked against the tokenizer's vocabulary."""
    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration token file not found: {path}")
    ids = torch.from_numpy(np.load(path, allow_pickle=False)).long()
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{path}: expected a non-empty [n_windows, seq_len] array, got shape {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{path}: token ids outside the tokenizer's vocabulary (0..{vocab_size - 1})")
    return ids


def calibration_data(tokenizer: Any, config: QuantizeConfig) -> torch.Tensor:
    if config.calib_tokens is not None:
        return load_calibration_tokens(config.calib_tokens, len(tokenizer))
    text = load_corpus(config.calib_data, split="train")
    # Twice the tokens needed, so the seeded window draw still has a choice to make.
    ids = sample_text_ids(tokenizer, text, 2 * config.n_calib * config.seq_len, config.seed)
    return calibration_windows(ids, config.n_calib, config.seq_len, config.seed, bos_to_prepend(tokenizer))


def run_record(source: str, model: nn.Module, config: QuantizeConfig, result: QuantizeResult) -> dict:
    """What goes into awqkit.json: deterministic, so equal runs give equal files."""
    import platform

    import transformers

    from awqkit import __version__

    return {
        "awqkit_version": __version__,
        "source_model": source,
        "dtype": str(model.dtype).removeprefix("torch."),
        "config": asdict(config),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "layers": {name: asdict(rec) for name, rec in result.layers.items()},
    }


def quantize(
    model_name_or_path: str,
    out_dir: str | Path,
    config: QuantizeConfig = QuantizeConfig(),
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Load a causal LM, quantize it and write a folder that plain transformers loads."""
    from awqkit.checkpoint import DTYPES, check_output_dir, load_model, load_tokenizer, save_quantized

    config.validate()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_output_dir(out_dir, overwrite)
    timings: dict[str, float] = defaultdict(float)
    # Text problems surface before the (slow) model load.
    with timed(timings, "calibration data"):
        tokenizer = load_tokenizer(model_name_or_path)
        windows = calibration_data(tokenizer, config)
        config = replace(config, n_calib=windows.shape[0], seq_len=windows.shape[1])
    with timed(timings, "load"):
        model, _ = load_model(model_name_or_path, dtype, tokenizer)
    log.info("calibrating on %d windows x %d tokens from %s", *windows.shape, config.calib_tokens or config.calib_data)
    result = quantize_model(model, windows, config, progress=progress)
    with timed(timings, "save"):
        save_quantized(model, tokenizer, out_dir, run_record(model_name_or_path, model, config, result), result.scales, overwrite)
    result.timings = {**timings, **result.timings}
    result.peak_rss_gib = peak_rss_gib()
    log.info(
        "done: %s; peak RSS %.2f GiB",
        ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in result.timings.items()),
        result.peak_rss_gib,
    )
    return result
