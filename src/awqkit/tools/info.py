"""What a checkpoint folder holds: format, bits, group size, size, bits per weight, who loads it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from awqkit.io.safetensors import TensorHeader, checkpoint_files, dtype_bits, tensor_headers
from awqkit.model.load import check_no_custom_code

LOADERS = {
    "awq": "transformers (with gptqmodel installed) and vLLM (awq, awq_marlin on capable GPUs)",
    "compressed-tensors": "transformers (with compressed-tensors installed; decompresses on CPU) and vLLM (compressed-tensors WNA16)",
    "fake": "any transformers or vLLM, as an ordinary float checkpoint",
    "gguf": "llama.cpp and the tools built on it (Ollama, LM Studio); transformers with gguf_file= (de-quantizes)",
    "float": "any transformers or vLLM, as an ordinary float checkpoint",
}


# Tensors that make up one quantized linear in each packed format.
PACKED_SUFFIXES = {
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
}


@dataclass
class CheckpointInfo:
    path: str
    format: str
    bits: int | None
    group_size: int | None
    dtype: str | None
    size_bytes: int
    quantized_linears: int
    quantized_weights: int
    bits_per_weight: float | None  # of the quantized linears, scales and zeros included
    loaders: str


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"cannot read {path}: not a JSON object")
    return content


def _bits_of(header: TensorHeader) -> int:
    return dtype_bits(header.dtype) * math.prod(header.shape)


def _quantized_linears(
    config: dict, record: dict | None, headers: dict[str, TensorHeader]
) -> tuple[str, int | None, int | None, list[str], int]:
    """Format, bits, group size, quantized linears and their weight count, from the metadata."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "awq":
        bits, group_size = quant.get("bits", quant.get("w_bit")), quant.get("group_size", quant.get("q_group_size"))
        bases = [k.removesuffix(".qweight") for k in headers if k.endswith(".qweight")]
        return "awq", bits, group_size, bases, sum(math.prod(headers[f"{b}.qweight"].shape) * 32 // bits for b in bases)
    if quant.get("quant_method") == "compressed-tensors":
        scheme = next(iter(quant["config_groups"].values()))["weights"]
        bits, group_size = scheme["num_bits"], scheme.get("group_size")
        bases = [k.removesuffix(".weight_packed") for k in headers if k.endswith(".weight_packed")]
        # weight_shape holds [out, in]; the packed width is in * bits / 32, rounded up.
        weights = sum(
            headers[f"{b}.weight_scale"].shape[0] * headers[f"{b}.weight_packed"].shape[1] * 32 // bits for b in bases
        )
        return "compressed-tensors", bits, group_size, bases, weights
    if record is not None:
        bases = list(record["layers"])
        weights = sum(math.prod(headers[f"{b}.weight"].shape) for b in bases)
        return "fake", record["config"]["bits"], record["config"]["group_size"], bases, weights
    return "float", None, None, [], 0


def _gguf_info(folder: Path, path: Path) -> CheckpointInfo:
    """A GGUF file's quantized linears: every 2-D tensor in a block type (Q4_1, Q4_0, Q8_0)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf's reader fails on garbage with whatever its parsing meets
        raise ValueError(f"cannot read {path}: not a readable GGUF file ({type(error).__name__}: {error})") from None
    quantized = [
        t for t in reader.tensors if t.tensor_type.name in ("Q4_1", "Q4_0", "Q8_0") and t.name.startswith("blk.")
    ]
    types = sorted({t.tensor_type.name for t in quantized})
    block_size = gguf.GGML_QUANT_SIZES[quantized[0].tensor_type][0] if quantized else None
    weights = sum(int(t.n_elements) for t in quantized)
    stored_bits = sum(int(t.n_bytes) * 8 for t in quantized)
    bits = {"Q4_1": 4, "Q4_0": 4, "Q8_0": 8}[types[0]] if types else None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    others = sorted({t.tensor_type.name for t in reader.tensors} - set(types))
    return CheckpointInfo(
        str(folder), f"gguf ({', '.join(types)})" if types else "gguf", bits, block_size, ", ".join(others) or None,
        size, len(quantized), weights, stored_bits / weights if weights else None, LOADERS["gguf"],
    )  # fmt: skip


def checkpoint_info(folder: str | Path) -> CheckpointInfo:
    folder = Path(folder)
    if (folder / "model.gguf").is_file() and not (folder / "config.json").is_file():
        return _gguf_info(folder, folder / "model.gguf")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {folder}")
    check_no_custom_code(folder)
    config = _read_json(folder / "config.json")
    record_path = folder / "awqkit.json"
    record = _read_json(record_path) if record_path.is_file() else None
    headers = tensor_headers(checkpoint_files(folder))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    dtype = config.get("dtype") or config.get("torch_dtype")
    # Metadata written by hand or by another tool can lack any field read here, or name tensors
    # the folder does not hold.
    try:
        fmt, bits, group_size, bases, weights = _quantized_linears(config, record, headers)
        suffixes = PACKED_SUFFIXES.get(fmt, ("weight",))
        stored_bits = sum(_bits_of(headers[f"{b}.{s}"]) for b in bases for s in suffixes if f"{b}.{s}" in headers)
    except (KeyError, TypeError, ZeroDivisionError, StopIteration, AttributeError) as error:
        raise ValueError(
            f"{folder}: quantization metadata does not match its tensors ({type(error).__name__}: {error})"
        ) from None
    if fmt == "float":
        return CheckpointInfo(str(folder), "float", None, None, dtype, size, 0, 0, None, LOADERS["float"])
    return CheckpointInfo(
        str(folder),
        fmt,
        bits,
        group_size,
        dtype,
        size,
        len(bases),
        weights,
        stored_bits / max(weights, 1),
        LOADERS[fmt],
    )


def format_info(info: CheckpointInfo) -> str:
    lines = [
        f"path:              {info.path}",
        f"format:            {info.format}",
        f"bits / group size: {info.bits or '-'} / {info.group_size or '-'}",
        f"dtype:             {info.dtype}",
        f"size on disk:      {info.size_bytes / 2**20:.1f} MiB",
        f"quantized linears: {info.quantized_linears} ({info.quantized_weights / 1e6:.1f} M weights)",
    ]
    if info.bits_per_weight is not None:
        lines.append(f"bits per weight:   {info.bits_per_weight:.3f} (quantized linears, scales and zeros included)")
    lines.append(f"loads in:          {info.loaders}")
    return "\n".join(lines)


def info_json(info: CheckpointInfo) -> dict:
    return asdict(info)
