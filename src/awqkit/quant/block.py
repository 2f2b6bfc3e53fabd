"""How one decoder block's linears get their scales and integers: one path for both scale modes.

A scale group is the set of linears that read one tensor. With shared scales the groups come from
the architecture table and 1/s folds into the op producing that tensor, so the stored weight is
Q(W*s) on the integer grid; with per-linear scales every linear is a group of one that folds
nowhere and the stored weight is Q(W*s)/s. Search, rounding and bookkeeping are the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from awqkit.config import QuantizeConfig
from awqkit.errors import NonFiniteError
from awqkit.model.layout import block_linears
from awqkit.model.scale_groups import UNCLIPPED, ScaleGroup, foldable
from awqkit.model.walk import BlockArgs, BlockVisit, LinearStats, hidden_of, window_count, window_of
from awqkit.quant.clip import clip_search
from awqkit.quant.fold import fold_normalizer, fold_scales
from awqkit.quant.grid import GroupQuantized, dequantize_groupwise, quantize_groupwise
from awqkit.quant.rounding import GptqFactory, GptqOptions, RoundingFactory, make_rounding
from awqkit.quant.rows import ALL_ROWS, RowShare, gather_quantized
from awqkit.quant.search import (
    ErrorFn,
    SearchResult,
    alpha_grid,
    gram_output_error,
    linear_output_error,
    round_again,
    scale_candidates,
    search_scales,
)
from awqkit.runtime import timed


@dataclass
class LayerRecord:
    alpha: float
    error: float | None
    flips: int | None = None
    scaling: str = "activation"
    clip: float | None = None  # the mean range ratio kept over the layer's groups (--clip)
    clipped: float | None = None  # the share of its groups clipped (--clip)
    # "rtn": too few calibration tokens to search (alpha 0, error None); or why the rounding fell back
    fallback: str | None = None
    folded_into: str | None = None  # shared scales: the op 1/s folded into (None: s = 1 on the grid)


@dataclass
class QuantizedLinear:
    record: LayerRecord
    scales: torch.Tensor  # the s applied, float32 on the CPU
    # Integers, scales and zeros of the stored weight when it lies on the grid (shared scales).
    quantized: GroupQuantized | None


class ModuleOutputError:
    """The MSE of ``module``'s output when the named weights (stacked by rows) are replaced by W_hat,
    on the module's recorded inputs. The module runs one calibration window at a time and the
    squares are summed in float64 per window: the parts of a ``SummedError``, so processes split
    the windows (each needs the whole W_hat) and every window's bits are the same in any split.
    """

    def __init__(self, module: nn.Module, weight_names: list[str], sizes: list[int], inputs: BlockArgs):
        self.module, self.weight_names, self.sizes = module, weight_names, sizes
        self.windows = [window_of(inputs, i) for i in range(window_count(inputs))]
        self.n_parts = len(self.windows)
        self.dtype = next(module.parameters()).dtype  # the module runs in the compute dtype; W_hat is float32
        self._references: dict[int, torch.Tensor] = {}

    def _output(self, window: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        from torch.func import functional_call

        args, kwargs = self.windows[window]
        with torch.no_grad():
            out = self.module(*args, **kwargs) if params is None else functional_call(self.module, params, args, kwargs)
        return hidden_of(out).float()

    def _reference(self, window: int) -> torch.Tensor:
        if window not in self._references:
            self._references[window] = self._output(window)
        return self._references[window]

    def window_sums(self, w_hat: torch.Tensor, windows: range) -> torch.Tensor:
        """The float64 sums of squared output differences of each window in ``windows`` (W_hat whole)."""
        params = dict(zip(self.weight_names, w_hat.to(self.dtype).split(self.sizes)))
        sums = [(self._output(i, params) - self._reference(i)).double().square().sum() for i in windows]
        return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=w_hat.device)

    def local_sums(self, w_hat: torch.Tensor, rows: RowShare) -> torch.Tensor:
        n_rows = sum(self.sizes)
        mine = rows.part(self.n_parts, unit=1)
        return self.window_sums(rows.gather(w_hat, n_rows), range(mine.start, mine.stop))

    def mean(self, sums: torch.Tensor) -> float:
        # Windows have one length, so any window's output size is every window's.
        window = next(iter(self._references), 0)
        return (sums.sum() / (self._reference(window).numel() * self.n_parts)).item()

    def __call__(self, w_hat: torch.Tensor) -> float:
        return self.mean(self.window_sums(w_hat, range(self.n_parts)))


def module_output_error(
    module: nn.Module, weight_names: list[str], sizes: list[int], inputs: BlockArgs
) -> ModuleOutputError:
    """The MSE of ``module``'s output on ``inputs`` when the named weights are replaced by W_hat."""
    return ModuleOutputError(module, weight_names, sizes, inputs)


def _group_error(
    visit: BlockVisit, group: ScaleGroup, w: torch.Tensor, sizes: list[int], config: QuantizeConfig
) -> ErrorFn:
    if config.objective == "module" and group.module is not None:
        module = visit.forward.get_submodule(group.module)
        names = [f"{name.removeprefix(group.module + '.')}.weight" for name in group.balance]
        return module_output_error(module, names, sizes, visit.module_inputs[group.module])
    stats = visit.stats[group.balance[0]]
    if config.search_error == "gram":
        return gram_output_error(stats.second_moment(), w)
    return linear_output_error(stats.search_tokens(), w)


def _rounding(config: QuantizeConfig, stats: LinearStats) -> RoundingFactory:
    gptq = GptqOptions(config.gptq_damp, config.gptq_block_size, config.gptq_order == "activation")
    second_moment = stats.second_moment() if config.rounding == "gptq" else None
    return make_rounding(config.rounding, stats.mean(), config.outlier_percent, second_moment, gptq)


def _timed(config: QuantizeConfig, rounding: RoundingFactory, timings: dict[str, float]) -> RoundingFactory:
    def timed_rounding(scales: torch.Tensor):
        strategy = rounding(scales)

        def apply(*args):
            with timed(timings, config.rounding):
                return strategy(*args)

        return apply

    return timed_rounding


def _flips(w: torch.Tensor, result: SearchResult, config: QuantizeConfig) -> torch.Tensor | None:
    """Which integers the rounding moved off nearest (None for nearest rounding)."""
    if config.rounding == "nearest":
        return None
    nearest = quantize_groupwise(
        w * result.scales, config.bits, config.group_size, symmetric=config.symmetric, clip=result.clip
    )
    return nearest.q != result.quantized.q


def _unclipped_rows(group: ScaleGroup, sizes: list[int], device: torch.device) -> torch.Tensor:
    """True for the stacked rows of the group's linears that are never clipped (q_proj, k_proj)."""
    frozen = [name.rsplit(".", 1)[-1] in UNCLIPPED for name in group.balance]
    return torch.tensor(frozen, device=device).repeat_interleave(torch.tensor(sizes, device=device))


def _search(
    visit: BlockVisit,
    group: ScaleGroup,
    w: torch.Tensor,
    sizes: list[int],
    config: QuantizeConfig,
    scale_free: bool,
    timings: dict[str, float],
    rows: RowShare,
) -> SearchResult:
    """The group's scales (s = 1 when ``scale_free``), then its clipping when asked for; this
    process quantizes its ``rows`` of the group's weight."""
    stats = visit.stats[group.balance[0]]
    error_of = _group_error(visit, group, w, sizes, config)
    factory = _rounding(config, stats)
    rounding = _timed(config, factory, timings)
    # Rounded after the search: alpha and the clip ranges chosen with nearest rounding.
    searched_with = make_rounding("nearest", stats.mean(), 0.0) if config.rounding_after_search else rounding
    if scale_free:  # a shared group with nowhere to fold: s = 1, on the grid
        candidates = scale_candidates("activation", [0.0], stats.mean_square())
    else:
        alphas = alpha_grid(config.n_grid)
        candidates = scale_candidates(
            config.scaling, alphas, stats.mean_square(), stats.mean_abs(), w, config.group_size
        )
    grid = {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric}
    result = search_scales(w, candidates, error_of, rounding=searched_with, rows=rows, **grid)
    if config.clip:
        with timed(timings, "clip"):
            frozen = _unclipped_rows(group, sizes, w.device)
            result = clip_search(w, result, stats.search_tokens(), error_of, rounding=searched_with,
                                 symmetric=config.symmetric, frozen_rows=frozen, rows=rows)  # fmt: skip
    if config.rounding_after_search:
        result = round_again(w, result, error_of, rounding=rounding, symmetric=config.symmetric, rows=rows)
    if isinstance(factory, GptqFactory) and factory.fell_back:
        result = replace(result, fallback="nearest: H not positive definite at any dampening")
    return result


def _round_to_nearest(w: torch.Tensor, config: QuantizeConfig, rows: RowShare) -> SearchResult:
    """RTN, s = 1 and nearest rounding, with no error to measure: for a linear whose input saw too
    few calibration tokens (an expert few tokens are routed to) to search on."""
    n_rows = w.shape[0]
    part = quantize_groupwise(w[rows.part(n_rows)], config.bits, config.group_size, symmetric=config.symmetric)
    return SearchResult(0.0, torch.ones_like(w[0]), gather_quantized(rows, part, n_rows), math.nan, [])


def _record(
    result: SearchResult, flips: int | None, rows: slice, fallback: str | None, folded_into: str | None
) -> LayerRecord:
    clip = None if result.clip is None else result.clip[rows]
    return LayerRecord(
        result.alpha,
        None if fallback == "rtn" else result.error,
        flips,
        result.scaling,
        # float64 sums of ratios in [0.55, 1] are exact, so the record does not depend on the order
        # (a whole layer's ratios are a transposed view, gathered workers' are contiguous)
        None if clip is None else float(clip.double().mean()),
        None if clip is None else float((clip < 1).double().mean()),
        fallback,
        folded_into,
    )


def _check_groups(visit: BlockVisit, groups: tuple[ScaleGroup, ...]) -> None:
    covered = [name for group in groups for name in group.balance]
    linears = sorted(block_linears(visit.block))
    if sorted(covered) != linears:
        raise RuntimeError(f"scale groups cover {sorted(covered)}, but the block's linears are {linears}")
    for group in groups:
        if any(visit.stats[name] is not visit.stats[group.balance[0]] for name in group.balance):
            raise RuntimeError(
                f"{', '.join(group.balance)} do not read one input tensor; the scale group table is wrong"
            )


def quantize_block(
    visit: BlockVisit,
    groups: tuple[ScaleGroup, ...],
    config: QuantizeConfig,
    *,
    norm_offset: float = 0.0,
    timings: dict[str, float] | None = None,
    progress: bool = False,
    rows: RowShare = ALL_ROWS,
) -> dict[str, QuantizedLinear]:
    """Search every scale group of ``visit.block``, fold where it folds, and set the stored weights.

    Groups go last to first: a fold into a linear's rows (up_proj <- down_proj's s) must happen
    before that linear is itself quantized. The block stays a float model with the same function
    until every group is searched, so each search sees the others unquantized, as in AWQ. With
    shared scales a group that cannot fold keeps s = 1, so its weight too is on the grid. Several
    workers split each weight's rows (``rows``) and all end with the whole result.
    """
    _check_groups(visit, groups)
    timings = {} if timings is None else timings
    on_grid = config.scales == "shared"
    done: dict[str, tuple[QuantizedLinear, torch.Tensor]] = {}
    for group in tqdm(list(reversed(groups)), desc=f"block {visit.index}", leave=False, disable=not progress):
        linears = [visit.block.get_submodule(name) for name in group.balance]
        w = torch.cat([linear.weight.data for linear in linears])
        sizes = [linear.out_features for linear in linears]
        folds = foldable(group, visit.block)
        fallback = "rtn" if visit.stats[group.balance[0]].count < config.min_tokens else None
        try:
            if fallback:
                result = _round_to_nearest(w, config, rows)
            else:
                result = _search(
                    visit, group, w, sizes, config, scale_free=on_grid and not folds, timings=timings, rows=rows
                )
        except NonFiniteError as error:
            raise NonFiniteError(f"block {visit.index} {', '.join(group.balance)}: {error}") from None
        flipped = _flips(w, result, config)  # before the division below, which moves rounding ties
        if folds:
            result = result.divided(
                fold_normalizer(visit.block.get_submodule(group.smooth), result.scales, norm_offset)
            )
            fold_scales(visit.block, group, result.scales, norm_offset)
            visit.sync_forward()
        # Folded, the stored weight is Q(W*s) itself; otherwise Q(W*s)/s (s = 1 on the grid).
        stored = dequantize_groupwise(result.quantized) if folds else result.dequantized()
        q = result.quantized
        parts = zip(group.balance, stored.split(sizes), q.q.split(sizes), q.scale.split(sizes), q.zero.split(sizes))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for i, (name, weight, q_part, scale, zero) in enumerate(parts):
            flips = None if flipped is None else int(flipped.split(sizes)[i].sum())
            # Integers fit in uint8 (bits <= 8): a quarter of the float memory while they wait.
            grid = replace(q, q=q_part.to(torch.uint8).cpu(), scale=scale.cpu(), zero=zero.cpu())
            record = _record(
                result,
                flips,
                slice(starts[i], starts[i] + sizes[i]),
                fallback or result.fallback,
                group.folds_into if folds else None,
            )
            done[name] = (
                QuantizedLinear(record, result.scales.float().cpu().clone(), grid if on_grid else None),
                weight,
            )
    for name, (_, weight) in done.items():
        visit.block.get_submodule(name).weight.data.copy_(weight)
    return {name: done[name][0] for name in block_linears(visit.block)}
