"""What a quantization run is asked to do: one frozen dataclass, checked before any work starts.

It is the one source of the quantize options: each field's type gives the CLI option's type and
choices (a ``Literal``), its metadata the help line, and the README's options table is tested
against it. Light on purpose: importing it loads no model, tensor or format code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from awqkit.formats.grids import check_format_grid

Rounding = Literal["nearest", "greedy", "gptq"]
SearchError = Literal["tokens", "gram"]
GptqOrder = Literal["activation", "stored"]
Scaling = Literal["activation", "duo", "both"]
Scales = Literal["per-linear", "shared"]
Objective = Literal["linear", "module"]
Format = Literal["fake", "awq", "compressed-tensors", "gguf"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
MoeCalibration = Literal["all", "routed"]

ROUNDINGS: tuple[str, ...] = get_args(Rounding)
SCALINGS: tuple[str, ...] = get_args(Scaling)
CHOICES: dict[str, tuple[str, ...]] = {
    "rounding": ROUNDINGS,
    "search_error": get_args(SearchError),
    "gptq_order": get_args(GptqOrder),
    "scaling": SCALINGS,
    "scales": get_args(Scales),
    "objective": get_args(Objective),
    "format": get_args(Format),
    "compute_dtype": get_args(ComputeDtype),
    "moe_calibration": get_args(MoeCalibration),
}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A config field and its command-line help, in one place."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = option(4, "bits per weight, 2..8")
    group_size: int = option(128, "weights per scale and zero point, along the input dimension")
    n_grid: int = option(20, "alphas i/n-grid for i = 0..n-grid; 0: plain round-to-nearest, no scaling")
    n_calib: int = option(128, "calibration windows")
    seq_len: int = option(512, "tokens per calibration window, BOS included")
    seed: int = option(42, "seed of the window draw and of the search-token sample")
    rounding: Rounding = option(
        "nearest", "nearest; greedy: flips toward zero mean output error; gptq: GPTQ's column-by-column error "
        "compensation from the input's Gram matrix, on the static group grid"
    )  # fmt: skip
    rounding_after_search: bool = option(
        False, "search alpha (and clip) with nearest rounding, then round the chosen grid with --rounding once "
        "(cheaper; otherwise alpha fits the rounding)"
    )  # fmt: skip
    search_error: SearchError = option(
        "tokens", "what the search's linear error is measured on: the --max-search-tokens sample, or every "
        "calibration token through the input's Gram matrix (gram)"
    )  # fmt: skip
    gptq_damp: float = option(0.01, "gptq: dampening added to H's diagonal, as a share of its mean")
    gptq_block_size: int = option(128, "gptq: columns per lazy block update")
    gptq_order: GptqOrder = option(
        "activation", "gptq: columns by decreasing E[x^2] (act order; the group grid stays static) or as stored"
    )
    scaling: Scaling = option(
        "activation",
        "activation: s = E[x^2]^alpha; duo: s = E|x|^alpha / mean|W|^(1-alpha); both: search the two, keep the better",
    )
    clip: bool = option(
        False, "after the scale search, shrink each group's range (ratios 1 to 0.55) where that lowers the output "
        "error; never q_proj and k_proj"
    )  # fmt: skip
    symmetric: bool = option(False, "symmetric grids: zero point 2^(bits-1) in every group")
    outlier_percent: float = option(0.05, "share of the most salient input channels greedy rounding never flips")
    max_search_tokens: int = option(2048, "seeded calibration tokens the search measures its error on")
    calib_data: str = option(
        "pydoc-topics", "calibration corpus: a name (pydoc-topics, python-doc, fortunes, foldoc, wikitext2, c4, "
        "agnews) or a .txt/.gz/.jsonl/.parquet path"
    )  # fmt: skip
    calib_tokens: str | None = option(
        None, "token windows [n, seq-len] saved with numpy (BOS included) to calibrate on instead of --calib-data",
        metavar="FILE.npy",
    )  # fmt: skip
    batch_size: int = option(8, "calibration windows per forward")
    compute_dtype: ComputeDtype = option(
        "float32", "dtype of the calibration forward and the search's products (weights, folds and quantization "
        "math stay float32): bfloat16 is faster on GPUs and CPUs with AVX512-BF16 or AMX, slower on AVX2-only CPUs"
    )  # fmt: skip
    scales: Scales = option(
        "per-linear", "per-linear: one s per linear, stored as Q(W*s)/s (fake only); shared: one s per input, "
        "folded into the norm or linear producing it, so packed formats can hold Q(W*s)"
    )  # fmt: skip
    objective: Objective = option(
        "linear", "what a shared s minimises: the linears' output error, or that of the attention or MLP they feed"
    )
    format: Format = option(
        "fake", "fake: float weights; awq: AutoAWQ GEMM int4; compressed-tensors: pack-quantized; gguf: llama.cpp "
        "Q4_1/Q4_0/Q8_0 (the packed formats need --scales shared)"
    )  # fmt: skip
    moe_calibration: MoeCalibration = option(
        "all", "mixture-of-experts: every token through every expert (all; the block's output from the routed "
        "ones) or each expert only its routed tokens (routed)"
    )  # fmt: skip
    min_tokens: int = option(
        64, "a linear whose input saw fewer calibration tokens (a rarely routed expert) gets RTN (s = 1, nearest), "
        "recorded as a fallback"
    )  # fmt: skip

    @property
    def needs_gram(self) -> bool:
        """Whether the walk keeps each input's Gram matrix (in^2 float64 numbers per input)."""
        return self.rounding == "gptq" or self.search_error == "gram"

    def validate(self) -> None:
        check_quant_args(self.bits, self.group_size)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                shown = name.replace("_", " ")
                raise ValueError(f"unknown {shown} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.moe_calibration == "routed" and self.scales == "shared":
            raise ValueError(
                "shared scales fold one s into the norm every expert reads, measured on every token: "
                "use --moe-calibration all"
            )
        if self.gptq_damp <= 0 or self.gptq_block_size < 1:
            raise ValueError(
                f"gptq-damp must be > 0 and gptq-block-size >= 1, got {self.gptq_damp} and {self.gptq_block_size}"
            )
        if self.min_tokens < 1:
            raise ValueError(f"min-tokens must be >= 1, got {self.min_tokens}")
        if self.n_grid < 0:
            raise ValueError(f"n-grid must be >= 0 (0: round-to-nearest with no scaling), got {self.n_grid}")
        for name in ("n_calib", "seq_len", "max_search_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.outlier_percent <= 1.0:
            raise ValueError(f"outlier-percent must be in [0, 1], got {self.outlier_percent}")
        if self.scales == "per-linear" and self.objective != "linear":
            raise ValueError("objective module needs --scales shared: per-linear scales cannot be folded into a module")
        if self.format != "fake" and self.scales != "shared":
            raise ValueError(
                f"format {self.format} stores Q(W*s) on an integer grid, which needs --scales shared "
                "(per-linear Q(W*s)/s is not on any grid)"
            )
        check_format_grid(self.format, self.bits, self.group_size, self.symmetric)


def check_quant_args(bits: int, group_size: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")


def parse_size(size: str | int) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (decimal and binary units)."""
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper()
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        unit = next((u for u in units if text.endswith(u)), "B")
        number = text[: len(text) - len(unit)] if text.endswith(unit) else text
        try:
            value = int(float(number) * units[unit])
        except ValueError:
            raise ValueError(
                f"cannot read size {size!r}: use bytes or a number with KB, MB, GB, KiB, MiB or GiB"
            ) from None
    if value < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return value
