"""The quantization run: the decoder walked block by block, each block calibrated, searched,
quantized and handed on, from a model in memory or streamed from its safetensors shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import GenerationConfig

from awqkit import __version__
from awqkit.config import DEFAULT_MAX_SHARD_SIZE, QuantizeConfig, parse_size
from awqkit.data.tokens import calibration_data
from awqkit.formats.folder import write_model_files
from awqkit.formats.gguf import check_gguf_model, check_gguf_tokenizer
from awqkit.formats.tensors import check_packable, stored_block_tensors
from awqkit.io.publish import check_not_input, check_output_dir, publish, recover_interrupted_publish, writes_named
from awqkit.io.resume import (
    Progress,
    clear_progress,
    fingerprint,
    load_hidden,
    open_partial,
    partial_folder,
    save_progress,
    unmark,
)
from awqkit.io.shards import ShardWriter
from awqkit.model.discover import discover_blocks
from awqkit.model.experts import has_experts
from awqkit.model.layout import DecoderLayout, block_linears, find_decoder, float_linears, linear_classes
from awqkit.model.linearize import linearize
from awqkit.model.load import DTYPES, load_tokenizer, resolve_model_folder
from awqkit.model.scale_groups import Architecture, architecture_of, per_linear_groups
from awqkit.model.streamed import StreamedModel
from awqkit.model.walk import (
    BlockInputs,
    BlockState,
    BlockVisit,
    capture_block_inputs,
    search_token_indices,
    walk_blocks,
)
from awqkit.quant.block import LayerRecord, QuantizedLinear, quantize_block
from awqkit.quant.grid import GroupQuantized
from awqkit.runtime import (
    cpu_name,
    library_versions,
    peak_device_gib,
    peak_rss_gib,
    release_freed_memory,
    resolve_device,
    synchronize,
    timed,
)
from awqkit.workers import Workers, start_workers

log = logging.getLogger("awqkit")

# Per finished block: the block, its quantized linears (names relative to it), its measurements.
OnBlock = Callable[[BlockVisit, dict[str, QuantizedLinear], dict[str, Any]], None]


@dataclass
class QuantizeResult:
    layers: dict[str, LayerRecord]
    # module name -> the s applied: per-linear, W_saved * s is on the grid; shared, W_saved is on
    # the grid and 1/s went into the op producing the linear's input.
    scales: dict[str, torch.Tensor]
    # module name -> integers, scales and zeros of the stored weight (packed formats only)
    quantized: dict[str, GroupQuantized] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: float = 0.0
    blocks: list[dict[str, Any]] = field(default_factory=list)


def _module_names(config: QuantizeConfig, architectures: list[Architecture] | None) -> list[str]:
    """Submodules whose inputs the module objective needs recorded (in the blocks that have them)."""
    if architectures is None or config.objective != "module":
        return []
    return list(dict.fromkeys(name for architecture in architectures for name in architecture.modules))


def quantize_blocks(
    layout: DecoderLayout,
    inputs: BlockInputs,
    config: QuantizeConfig,
    on_block: OnBlock,
    *,
    architecture: Architecture | None,
    device: torch.device,
    block_state: BlockState | None = None,
    start: int = 0,
    timings: dict[str, float],
    progress: bool = True,
    workers: Workers = Workers(),
) -> None:
    """The one block walk: every block from ``start`` calibrated, searched, quantized, handed on."""
    architectures = None  # per block; None: per-linear groups
    if config.scales == "shared":
        if architecture is not None:
            architectures = [architecture] * len(layout.blocks)
        else:
            architectures = workers.broadcast(discover_blocks(layout, inputs) if workers.writes else None)
    n_tokens = sum(inputs.batch_tokens)
    steps = walk_blocks(
        layout,
        inputs,
        search_indices=search_token_indices(n_tokens, config.max_search_tokens, config.seed),
        compute_dtype=getattr(torch, config.compute_dtype),
        device=device,
        record_modules=_module_names(config, architectures),
        block_state=block_state,
        start=start,
        workers=workers,
        every_token=config.moe_calibration == "all",
        gram=config.needs_gram,
    )
    bar = tqdm(total=len(layout.blocks), initial=start, desc="blocks", unit="block", disable=not progress)
    while True:
        began = time.perf_counter()
        with timed(timings, "calibration"):
            visit = next(steps, None)
            synchronize(device)
        if visit is None:
            break
        with timed(timings, "search"):
            own = architectures[visit.index] if architectures is not None else None
            results = quantize_block(
                visit,
                own.groups(visit.block) if own is not None else per_linear_groups(visit.block),
                config,
                norm_offset=own.norm_offset if own is not None else 0.0,
                timings=timings,
                progress=progress,
                rows=workers,
            )
            synchronize(device)
        measured = {
            "block": visit.index,
            "seconds": round(time.perf_counter() - began, 3),
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        if (device_gib := peak_device_gib(device)) is not None:
            measured["peak_device_gib"] = round(device_gib, 3)
        on_block(visit, results, measured)
        del visit
        bar.update()
        release_freed_memory(device)
    bar.close()


def quantize_model(
    model: torch.nn.Module,
    windows: torch.Tensor,
    config: QuantizeConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> QuantizeResult:
    """Quantize every linear of the decoder blocks of an in-memory ``model`` in place.

    Per-linear scales leave Q(W*s)/s in each linear; shared scales leave Q(W*s) with 1/s folded
    into the norms and linears that feed them, and return the integers in ``result.quantized``
    when a packed format will be written.
    """
    config.validate()
    linearize(model)
    if config.format == "awq" and has_experts(model):
        raise ValueError(AWQ_EXPERTS)
    layout = find_decoder(model)
    architecture = architecture_of(model) if config.scales == "shared" else None
    timings: dict[str, float] = {}
    with timed(timings, "calibration"):
        inputs = capture_block_inputs(layout, windows, config.batch_size, getattr(torch, config.compute_dtype))
    result = QuantizeResult({}, {})

    def keep(visit: BlockVisit, linears: dict[str, QuantizedLinear], measured: dict[str, Any]) -> None:
        layout.blocks[visit.index].load_state_dict(visit.stored_state())
        prefix = f"{layout.blocks_name}.{visit.index}."
        for name, linear in linears.items():
            result.layers[prefix + name], result.scales[prefix + name] = linear.record, linear.scales
            if linear.quantized is not None and config.format != "fake":
                result.quantized[prefix + name] = linear.quantized
        result.blocks.append(measured)

    quantize_blocks(
        layout, inputs, config, keep, architecture=architecture, device=resolve_device(device),
        timings=timings, progress=progress,
    )  # fmt: skip
    result.timings, result.peak_rss_gib = timings, peak_rss_gib()
    return result


def run_record(source: str, dtype: str, config: QuantizeConfig, layers: dict[str, Any]) -> dict:
    """What goes into awqkit.json: deterministic, so equal runs give equal files."""
    return {
        "awqkit_version": __version__,
        "source_model": source,
        "dtype": dtype,
        "config": asdict(config),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "layers": {name: asdict(rec) if isinstance(rec, LayerRecord) else rec for name, rec in layers.items()},
    }


def quantize(
    model_name_or_path: str,
    out_dir: str | Path,
    config: QuantizeConfig = QuantizeConfig(),
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize a safetensors causal LM block by block, streamed from its shards, into ``out_dir``.

    Only one block is in memory at a time; each is written to the output shards when done. The
    output is built in a hidden sibling folder that the same command, run again after a kill,
    continues from; it is renamed to ``out_dir`` when complete.
    """
    run = _prepare(model_name_or_path, out_dir, config, dtype, device, max_shard_size, overwrite)
    show = progress and run.workers.writes
    saved = _open(run, show)
    with _discarded_on_bad_input(run), writes_named(run.partial):
        output = _resume(run, saved)
        _walk_and_write(run, output, show)
        result = QuantizeResult(
            {name: LayerRecord(**rec) for name, rec in output.progress.layers.items()},
            {},
            timings=run.timings,
            blocks=output.progress.blocks,
        )
        if run.workers.writes:
            _publish(run, output, result)
    return result


@dataclass
class _StreamedRun:
    """What a streamed run was asked and found before any output is written."""

    model_name_or_path: str
    out: Path
    overwrite: bool
    config: QuantizeConfig  # n_calib and seq_len as the windows have them
    dtype: str
    max_shard_bytes: int
    workers: Workers
    device: torch.device
    folder: Path  # the model's local folder
    tokenizer: Any
    windows: torch.Tensor
    source: StreamedModel
    architecture: Architecture | None
    timings: dict[str, float]

    @property
    def partial(self) -> Path:
        return partial_folder(self.out)

    def stored(self, module: str) -> str:
        """A linear (or any module with a weight) by the checkpoint's name."""
        return self.source.stored_name(f"{module}.weight").removesuffix(".weight")

    def fingerprint(self, progress: bool) -> str:
        """What must be equal for a partial folder to be this run's: the input files by content."""
        return fingerprint({
            "awqkit": library_versions(), "config": asdict(self.config), "dtype": self.dtype,
            "device": str(self.device), "source": self.source.files.identity(progress),
            "windows": hashlib.sha256(self.windows.numpy().tobytes()).hexdigest(),
            "max_shard_bytes": self.max_shard_bytes, "workers": self.workers.world,
        })  # fmt: skip


def _prepare(
    model_name_or_path: str,
    out_dir: str | Path,
    config: QuantizeConfig,
    dtype: str,
    device: str,
    max_shard_size: str | int,
    overwrite: bool,
) -> _StreamedRun:
    """Every check that can fail on the input, before any output is written: options, output path,
    calibration text, the model's structure against the format."""
    config.validate()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    workers, compute_device = start_workers(resolve_device(device))
    if workers.writes:
        recover_interrupted_publish(out_dir)
    workers.barrier()
    out = check_output_dir(out_dir, overwrite)
    folder = resolve_model_folder(model_name_or_path)
    check_not_input(out, folder)
    timings: dict[str, float] = {}
    # Text problems surface before the model is opened.
    with timed(timings, "calibration data"):
        tokenizer = load_tokenizer(str(folder))
        windows = calibration_data(tokenizer, config)
        config = replace(config, n_calib=windows.shape[0], seq_len=windows.shape[1])
    n_batches = -(-windows.shape[0] // config.batch_size)
    if n_batches < workers.world:  # a worker with no batch would hold no statistics to pool
        raise ValueError(
            f"{workers.world} workers need at least {workers.world} calibration batches; {windows.shape[0]} windows "
            f"in batches of {config.batch_size} make {n_batches}: lower --batch-size or start fewer workers"
        )
    source = StreamedModel(folder, None if dtype == "auto" else DTYPES[dtype])
    _check_fits(source, config)
    if config.format == "gguf":
        check_gguf_tokenizer(tokenizer)
    architecture = architecture_of(source.model) if config.scales == "shared" else None
    log.info("calibrating on %d windows x %d tokens from %s", *windows.shape, config.calib_tokens or config.calib_data)
    return _StreamedRun(
        model_name_or_path, out, overwrite, config, dtype, max_shard_bytes, workers, compute_device, folder,
        tokenizer, windows, source, architecture, timings,
    )  # fmt: skip


@dataclass
class _Output:
    """The partial folder being written: its saved progress, its writers (worker 0 only) and the
    inputs entering the first block still to do."""

    progress: Progress
    inputs: BlockInputs
    weights: ShardWriter | None = None
    scales: ShardWriter | None = None


def _open(run: _StreamedRun, progress: bool) -> Progress:
    """The partial folder of this very run (a stale one is cleared) and its saved progress."""
    saved = None
    if run.workers.writes:
        run.out.parent.mkdir(parents=True, exist_ok=True)
        with timed(run.timings, "input digest"):
            identity = run.fingerprint(progress)
        saved = open_partial(run.partial, identity)
    return run.workers.broadcast(saved)


@contextmanager
def _discarded_on_bad_input(run: _StreamedRun) -> Iterator[None]:
    """Bad input (a NaN weight, say) fails the same way again: nothing to resume, nothing kept."""
    try:
        yield
    except ValueError:
        if run.workers.writes:
            shutil.rmtree(run.partial, ignore_errors=True)
        raise


def _resume(run: _StreamedRun, saved: Progress) -> _Output:
    """The partial folder's writers (worker 0) and the hidden states entering the block to start
    from: captured from the embeddings, or saved by the run that stopped."""
    workers, config, source = run.workers, run.config, run.source
    weights = scales = None
    if workers.writes:
        weights = ShardWriter(run.partial, "model", run.max_shard_bytes, saved.writers.get("model"))
        scales = ShardWriter(run.partial, "awq_scales", state=saved.writers.get("scales"))
    n_batches = -(-run.windows.shape[0] // config.batch_size)
    with timed(run.timings, "calibration"):
        source.materialize_decoder()
        dtype_of_products = getattr(torch, config.compute_dtype)
        batches = workers.batches(n_batches)
        inputs = capture_block_inputs(source.layout, run.windows, config.batch_size, dtype_of_products, batches)
        source.release_decoder()
    if saved.next_block > 0:
        inputs.hidden = load_hidden(run.partial, saved.next_block, workers)
    elif weights is not None:
        with timed(run.timings, "save"):
            weights.add(source.stored_names(source.read(source.non_block_names())))
    return _Output(saved, inputs, weights, scales)


class _BlockWriter:
    """The walk's hand-off for a streamed run: each finished block appended to the shards, its
    records and the next block's inputs saved, so a stopped run continues after it."""

    def __init__(self, run: _StreamedRun, output: _Output):
        self.run, self.output = run, output

    def __call__(self, visit: BlockVisit, linears: dict[str, QuantizedLinear], measured: dict[str, Any]) -> None:
        run, progress, weights, scales = self.run, self.output.progress, self.output.weights, self.output.scales
        prefix = run.source.block_prefix(visit.index)
        with timed(run.timings, "save"):
            progress.layers.update(
                {run.stored(prefix + name): asdict(linear.record) for name, linear in linears.items()}
            )
            progress.blocks.append(measured)
            first_weight = visit.stored_dtypes[f"{next(iter(linears))}.weight"]
            progress.stored_dtype = progress.stored_dtype or _dtype_name(first_weight)
            progress.next_block = visit.index + 1
            if weights is not None and scales is not None:
                quantized = {name: linear.quantized for name, linear in linears.items() if linear.quantized is not None}
                tensors = stored_block_tensors(visit.block, prefix, visit.stored_state(), quantized, run.config.format)
                weights.add(run.source.stored_names(tensors))
                scales.add({run.stored(prefix + name): linear.scales for name, linear in linears.items()})
                progress.writers = {"model": weights.state(), "scales": scales.state()}
            save_progress(run.partial, progress, visit.outputs, run.workers)
            if weights is not None and scales is not None:
                weights.saved(), scales.saved()


def _walk_and_write(run: _StreamedRun, output: _Output, progress: bool) -> None:
    """The block walk from the first block not yet written, each block written as it finishes."""
    quantize_blocks(
        run.source.layout, output.inputs, run.config, _BlockWriter(run, output), architecture=run.architecture,
        device=run.device, block_state=run.source.block_state, start=output.progress.next_block,
        timings=run.timings, progress=progress, workers=run.workers,
    )  # fmt: skip


def _publish(run: _StreamedRun, output: _Output, result: QuantizeResult) -> None:
    """Finish the partial folder (shards named, config, tokenizer, records) and rename it into place."""
    assert output.weights is not None and output.scales is not None  # worker 0 publishes
    with timed(run.timings, "save"):
        clear_progress(run.partial)
        output.weights.finish()
        output.scales.finish()
        record = run_record(
            run.model_name_or_path, output.progress.stored_dtype or "", run.config, output.progress.layers
        )
        generation = _generation_config(run.folder)
        # by the model's names (transformers matches those) and the checkpoint's (vLLM matches those)
        ignored = sorted({n for name in float_linears(run.source.model) for n in (name, run.stored(name))})
        config = run.source.config
        write_model_files(
            run.partial,
            config,
            generation,
            run.tokenizer,
            record,
            None,
            run.config.format,
            ignored,
            run.folder,
            linear_classes(run.source.model),
        )
    result.peak_rss_gib = peak_rss_gib()
    _write_measurements(run.partial, result, run.device)
    publish(run.partial, run.out, run.overwrite)
    unmark(run.out)
    log.info(
        "done: %s; peak RSS %.2f GiB",
        ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in run.timings.items()),
        result.peak_rss_gib,
    )


# transformers reads AutoAWQ GEMM tensors into nn.Linear only, not into its fused experts
AWQ_EXPERTS = "format awq cannot hold mixture-of-experts weights; use compressed-tensors (vLLM) or fake"


def _check_fits(source: Any, config: QuantizeConfig) -> None:

    max_positions = getattr(source.config, "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise ValueError(f"seq-len {config.seq_len} exceeds the model's max_position_embeddings ({max_positions})")
    if config.format != "fake":
        linears = {n: m for block in source.layout.blocks for n, m in block_linears(block).items()}
        check_packable(config.format, linears, config.group_size)
    if config.format == "gguf":
        check_gguf_model(source.config)
    if config.format == "awq" and has_experts(source.model):
        raise ValueError(AWQ_EXPERTS)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _generation_config(folder: Path) -> Any:
    return GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None


MEASUREMENTS = "awqkit-run.json"


def _write_measurements(folder: Path, result: QuantizeResult, device: torch.device) -> None:
    """Timings and memory of this run: the one output file that differs between equal runs."""
    measurements = {
        "device": str(device),
        "cpu": cpu_name(),
        "stages_s": {stage: round(seconds, 3) for stage, seconds in result.timings.items()},
        "peak_rss_gib": round(result.peak_rss_gib, 3),
        "blocks": result.blocks,
    }
    (folder / MEASUREMENTS).write_text(json.dumps(measurements, indent=1) + "\n")
