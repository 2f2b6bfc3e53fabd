"""The quantization run, end to end, as functions over one config dataclass."""

from __future__ import annotations

import functools
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

from awqkit.architectures import Architecture, ScaleGroup, architecture_of, block_linears, find_decoder, foldable
from awqkit.calibration import (
    BlockVisit,
    LinearStats,
    bos_to_prepend,
    calibration_windows,
    sample_text_ids,
    search_token_indices,
    walk_blocks,
)
from awqkit.corpora import load_corpus
from awqkit.folding import fold_scales
from awqkit.quant import GroupQuantized, check_quant_args, dequantize_groupwise, quantize_groupwise
from awqkit.rounding import ROUNDINGS, RoundingFactory, make_rounding
from awqkit.search import ErrorFn, SearchResult, alpha_grid, linear_output_error, search_alpha

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
    # The dtype of the calibration forward and the search's products; the quantization arithmetic
    # is float32 either way. fp32 matmuls are ~7x faster than bf16 on AVX2-only CPUs (110 vs 15
    # GFLOP/s), bf16 ~4x faster than fp32 on CPUs with AVX512-BF16 or AMX (766 vs 180) and on GPUs.
    compute_dtype: str = "float32"
    # per-linear: each linear its own s, stored as Q(W*s)/s (the research method, fake-quant only).
    # shared: one s per set of linears reading one input, folded into the op producing it, so the
    # stored weight is Q(W*s) itself and packed formats can hold it.
    scales: str = "per-linear"
    # What a shared s minimises: the set's stacked linear outputs, or the output of the module the
    # set feeds (attention for q, k, v; the MLP for gate, up), as llm-awq and llm-compressor do.
    objective: str = "linear"
    format: str = "fake"

    def validate(self) -> None:
        check_quant_args(self.bits, self.group_size)
        if self.n_grid < 0:
            raise ValueError(f"n-grid must be >= 0 (0: round-to-nearest with no scaling), got {self.n_grid}")
        for name in ("n_calib", "seq_len", "max_search_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if not 0.0 <= self.outlier_percent <= 1.0:
            raise ValueError(f"outlier-percent must be in [0, 1], got {self.outlier_percent}")
        for name, allowed in (("scales", SCALES), ("objective", OBJECTIVES), ("format", FORMATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.scales == "per-linear" and self.objective != "linear":
            raise ValueError("objective module needs --scales shared: per-linear scales cannot be folded into a module")
        if self.format != "fake" and self.scales != "shared":
            raise ValueError(
                f"format {self.format} stores Q(W*s) on an integer grid, which needs --scales shared "
                "(per-linear Q(W*s)/s is not on any grid)"
            )
        if self.format == "awq" and self.bits != 4:
            raise ValueError(f"format awq (AutoAWQ GEMM) holds 4-bit weights only, got bits {self.bits}")


SCALES = ("per-linear", "shared")
OBJECTIVES = ("linear", "module")
FORMATS = ("fake", "awq", "compressed-tensors")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

@dataclass
class LayerRecord:
    alpha: float
    error: float
    flips: int | None = None


@dataclass
class QuantizeResult:
    layers: dict[str, LayerRecord]
    # module name -> the s applied: per-linear, W_saved * s is on the grid; shared, W_saved is on
    # the grid and 1/s went into the op producing the linear's input.
    scales: dict[str, torch.Tensor]
    # module name -> integers, scales and zeros of the stored weight (shared scales only)
    quantized: dict[str, GroupQuantized] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: float = 0.0


def release_freed_memory() -> None:
    """Hand memory freed by this block's temporaries back to the OS (glibc only).

    Two threads allocating from their own malloc arenas leave freed chunks scattered, so peak RSS
    grew by 0.0-0.3 GiB run to run on SmolLM2 without this; with it, it is flat (measured).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


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


def _rounding(config: QuantizeConfig, stats: LinearStats, timings: dict[str, float]) -> RoundingFactory:
    rounding = make_rounding(config.rounding, stats.mean(), config.outlier_percent)

    def timed_rounding(scales: torch.Tensor):
        strategy = rounding(scales)

        def apply(*args):
            with timed(timings, config.rounding):
                return strategy(*args)

        return apply

    return timed_rounding


def _flipped(w: torch.Tensor, result: SearchResult, config: QuantizeConfig) -> torch.Tensor | None:
    """Which integers the rounding moved off nearest (None for nearest rounding)."""
    if config.rounding == "nearest":
        return None
    nearest = quantize_groupwise(w * result.scales, config.bits, config.group_size)
    return nearest.q != result.quantized.q


def quantize_linear(
    linear: nn.Linear, stats: LinearStats, config: QuantizeConfig, timings: dict[str, float]
) -> tuple[LayerRecord, torch.Tensor]:
    """Search alpha for one linear, write Q(W*s)/s into it, return its record and s."""
    w = linear.weight.data.float()
    result = search_alpha(
        w,
        stats.mean_square(),
        linear_output_error(stats.search_tokens(), w),
        bits=config.bits,
        group_size=config.group_size,
        alphas=alpha_grid(config.n_grid),
        rounding=_rounding(config, stats, timings),
    )
    flipped = _flipped(w, result, config)
    record = LayerRecord(result.alpha, result.error, None if flipped is None else int(flipped.sum()))
    linear.weight.data.copy_(result.dequantized())
    return record, result.scales


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def module_output_error(module: nn.Module, weight_names: list[str], sizes: list[int], inputs: tuple) -> ErrorFn:
    """The MSE of ``module``'s output when the named weights (stacked by rows) are replaced."""
    from torch.func import functional_call

    args, kwargs = inputs
    with torch.no_grad():
        reference = _first(module(*args, **kwargs)).float()
    dtype = next(module.parameters()).dtype  # the module runs in the compute dtype; W_hat is float32

    def error_of(w_hat: torch.Tensor) -> float:
        params = dict(zip(weight_names, w_hat.to(dtype).split(sizes)))
        with torch.no_grad():
            return (_first(functional_call(module, params, args, kwargs)).float() - reference).pow(2).mean().item()

    return error_of


def _group_error(visit: BlockVisit, group: ScaleGroup, w: torch.Tensor, sizes: list[int], config: QuantizeConfig) -> ErrorFn:
    stats = visit.stats[group.balance[0]]
    if config.objective == "module" and group.module is not None:
        module = visit.block.get_submodule(group.module)
        names = [f"{name.removeprefix(group.module + '.')}.weight" for name in group.balance]
        return module_output_error(module, names, sizes, visit.module_inputs[group.module])
    return linear_output_error(stats.search_tokens(), w)


def _check_groups(visit: BlockVisit, groups: tuple[ScaleGroup, ...]) -> None:
    covered = [name for group in groups for name in group.balance]
    if sorted(covered) != sorted(block_linears(visit.block)):
        raise RuntimeError(f"scale groups cover {sorted(covered)}, but the block's linears are {sorted(block_linears(visit.block))}")
    for group in groups:
        if any(visit.stats[name] is not visit.stats[group.balance[0]] for name in group.balance):
            raise RuntimeError(f"{', '.join(group.balance)} do not read one input tensor; the scale group table is wrong")


def quantize_block_shared(
    visit: BlockVisit, architecture: Architecture, config: QuantizeConfig, timings: dict[str, float]
) -> dict[str, tuple[LayerRecord, torch.Tensor, GroupQuantized]]:
    """One s per scale group, folded, and every linear of the block set to Q(W*s) on its grid.

    Groups go last to first: a fold into a linear's rows (up_proj <- down_proj's s) must happen
    before that linear is itself quantized. The block stays a float model with the same function
    until every group is searched, so each search sees the others unquantized, as in AWQ.
    """
    _check_groups(visit, architecture.scale_groups)
    done: dict[str, tuple[LayerRecord, torch.Tensor, GroupQuantized]] = {}
    for group in reversed(architecture.scale_groups):
        linears = [visit.block.get_submodule(name) for name in group.balance]
        stats = visit.stats[group.balance[0]]
        w = torch.cat([linear.weight.data for linear in linears]).float()
        sizes = [linear.out_features for linear in linears]
        scalable = foldable(group, visit.block)
        result = search_alpha(
            w,
            stats.mean_square(),
            _group_error(visit, group, w, sizes, config),
            bits=config.bits,
            group_size=config.group_size,
            # An s that cannot be folded is s = 1: round-to-nearest (or greedy) alone.
            alphas=alpha_grid(config.n_grid) if scalable else [0.0],
            rounding=_rounding(config, stats, timings),
        )
        if scalable:
            fold_scales(visit.block, group, result.scales, architecture.norm_offset)
        flipped = _flipped(w, result, config)
        q = result.quantized
        for i, (name, q_part, scale, zero) in enumerate(
            zip(group.balance, q.q.split(sizes), q.scale.split(sizes), q.zero.split(sizes))
        ):
            # Integers fit in uint8 (bits <= 8): a quarter of the float memory while they wait for the writer.
            part = GroupQuantized(q_part.to(torch.uint8), scale, zero, q.bits, q.group_size)
            flips = None if flipped is None else int(flipped.split(sizes)[i].sum())
            done[name] = (LayerRecord(result.alpha, result.error, flips), result.scales, part)
    for name, (_, _, part) in done.items():
        visit.block.get_submodule(name).weight.data.copy_(dequantize_groupwise(part))
    return {name: done[name] for name in block_linears(visit.block)}


def quantize_model(
    model: nn.Module, windows: torch.Tensor, config: QuantizeConfig, *, progress: bool = True
) -> QuantizeResult:
    """Quantize every linear of the decoder blocks of ``model`` in place.

    Per-linear scales leave Q(W*s)/s in each linear; shared scales leave Q(W*s) with 1/s folded
    into the norms and linears that feed them, and return the integers in ``result.quantized``
    when a packed format will be written.
    """
    config.validate()
    layout = find_decoder(model)
    shared = config.scales == "shared"
    architecture = architecture_of(model) if shared else None
    modules = [g.module for g in architecture.scale_groups if g.module] if shared and config.objective == "module" else []
    timings: dict[str, float] = defaultdict(float)
    search_indices = search_token_indices(windows.numel(), config.max_search_tokens, config.seed)
    steps = walk_blocks(
        layout,
        windows,
        search_indices=search_indices,
        batch_size=config.batch_size,
        compute_dtype=getattr(torch, config.compute_dtype),
        record_modules=modules,
    )
    result = QuantizeResult({}, {})
    blocks_bar = tqdm(total=len(layout.blocks), desc="blocks", disable=not progress)
    for visit in _timed_steps(steps, timings, "calibration"):
        prefix = f"{layout.blocks_name}.{visit.index}."
        with timed(timings, "search"):
            if shared:
                for name, (record, s, part) in quantize_block_shared(visit, architecture, config, timings).items():
                    result.layers[prefix + name], result.scales[prefix + name] = record, s.float().clone()
                    if config.format != "fake":  # only the packed writers need the integers
                        result.quantized[prefix + name] = part
            else:
                for name, linear in tqdm(
                    [(n, m) for n, m in visit.block.named_modules() if n in visit.stats],
                    desc=f"block {visit.index}",
                    leave=False,
                    disable=not progress,
                ):
                    record, s = quantize_linear(linear, visit.stats[name], config, timings)
                    result.layers[prefix + name], result.scales[prefix + name] = record, s.float().clone()
        blocks_bar.update()
        release_freed_memory()
    blocks_bar.close()
    if config.rounding in timings:
        timings["search"] -= timings[config.rounding]
    result.timings, result.peak_rss_gib = dict(timings), peak_rss_gib()
    return result


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
    if config.format != "fake":
        from awqkit.formats import check_packable

        layout = find_decoder(model)
        check_packable(config.format, {n: m for block in layout.blocks for n, m in block_linears(block).items()}, config.group_size)
    log.info("calibrating on %d windows x %d tokens from %s", *windows.shape, config.calib_tokens or config.calib_data)
    result = quantize_model(model, windows, config, progress=progress)
    with timed(timings, "save"):
        save_quantized(
            model,
            tokenizer,
            out_dir,
            run_record(model_name_or_path, model, config, result),
            result.scales,
            overwrite,
            format=config.format,
            quantized=result.quantized,
        )
    result.timings = {**timings, **result.timings}
    result.peak_rss_gib = peak_rss_gib()
    log.info(
        "done: %s; peak RSS %.2f GiB",
        ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in result.timings.items()),
        result.peak_rss_gib,
    )
    return result
