"""What a quantization run is asked to do: one frozen dataclass, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from awqkit.formats.gguf import check_gguf
from awqkit.quantize.grid import check_quant_args
from awqkit.quantize.rounding import ROUNDINGS
from awqkit.quantize.search import SCALINGS

SCALES = ("per-linear", "shared")
OBJECTIVES = ("linear", "module")
FORMATS = ("fake", "awq", "compressed-tensors", "gguf")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
MOE_CALIBRATIONS = ("all", "routed")


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128
    n_grid: int = 20
    n_calib: int = 128
    seq_len: int = 512
    seed: int = 42
    rounding: str = "nearest"
    # activation: s = E[x^2]^alpha (the seed's AWQ). duo: s = E|x|^alpha / mean|W^|^(1 - alpha)
    # (llm-compressor's default). both: the search tries the two grids and keeps the better.
    scaling: str = "activation"
    # After the scale search, shrink each group's range by the ratio (1 to 0.55) with the least
    # output error, as AutoAWQ's auto_clip; never on q_proj/k_proj.
    clip: bool = False
    # zero = 2^(b-1) in every group (compressed-tensors' symmetric int); asymmetric min-max otherwise.
    symmetric: bool = False
    outlier_percent: float = 0.05
    max_search_tokens: int = 2048
    # Offline everywhere: the Python reference text in every CPython (see awqkit.data.corpora).
    calib_data: str = "pydoc-topics"
    # Token windows [n, seq_len] saved with numpy (.npy), BOS included: used as-is instead of
    # drawing from calib_data, so other tools can calibrate on exactly the same tokens.
    calib_tokens: str | None = None
    batch_size: int = 8
    # The dtype of the calibration forward and the search's products. Weights, folds and the
    # quantization arithmetic stay float32 whatever it is, and parameters that are not quantized
    # are stored exactly as loaded. bf16 multiplies fastest on GPUs and on CPUs with AVX512-BF16
    # or AMX; on AVX2-only CPUs float32 is several times faster.
    compute_dtype: str = "float32"
    # per-linear: each linear its own s, stored as Q(W*s)/s (the research method, fake-quant only).
    # shared: one s per set of linears reading one input, folded into the op producing it, so the
    # stored weight is Q(W*s) itself and packed formats can hold it.
    scales: str = "per-linear"
    # What a shared s minimises: the set's stacked linear outputs, or the output of the module the
    # set feeds (attention for q, k, v; the MLP for gate, up), as llm-awq and llm-compressor do.
    objective: str = "linear"
    format: str = "fake"
    # Mixture-of-experts calibration: "all" runs every token through every expert (each expert's
    # statistics from all tokens, the block's output from the routed experts only); "routed" gives
    # each expert only the tokens routed to it.
    moe_calibration: str = "all"
    # A linear whose input saw fewer calibration tokens (an expert few tokens are routed to) gets
    # s = 1 and nearest rounding (RTN), recorded as a fallback, instead of a search on too little.
    min_tokens: int = 64

    def validate(self) -> None:
        check_quant_args(self.bits, self.group_size)
        if self.moe_calibration not in MOE_CALIBRATIONS:
            raise ValueError(f"unknown moe calibration {self.moe_calibration!r}; choose one of {', '.join(MOE_CALIBRATIONS)}")
        if self.moe_calibration == "routed" and self.scales == "shared":
            raise ValueError("shared scales fold one s into the norm every expert reads, measured on every token: "
                             "use --moe-calibration all")
        if self.min_tokens < 1:
            raise ValueError(f"min-tokens must be >= 1, got {self.min_tokens}")
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
        for name, allowed in (("scales", SCALES), ("objective", OBJECTIVES), ("format", FORMATS), ("scaling", SCALINGS)):
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
        if self.format == "gguf":
            check_gguf(self.bits, self.group_size, self.symmetric)
        if self.format == "awq" and self.symmetric:
            raise ValueError(
                "format awq (AutoAWQ GEMM) is asymmetric: drop --symmetric, or use --format compressed-tensors, "
                "which holds symmetric grids"
            )


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
            raise ValueError(f"cannot read size {size!r}: use bytes or a number with KB, MB, GB, KiB, MiB or GiB") from None
    if value < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return value
