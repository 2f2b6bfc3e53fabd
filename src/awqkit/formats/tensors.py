"""A block's tensors as a format stores them: packed formats that transformers and vLLM load.

The fake-quant format keeps float weights; the packed formats replace each quantized linear's
weight by its format's tensors and add quantization_config to config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqkit.formats.awq_gemm import awq_gemm_tensors, awq_quantization_config
from awqkit.formats.gguf import gguf_blocks
from awqkit.formats.pack_quantized import pack_quantized_tensors, write_pack_quantized_config
from awqkit.model.linearize import as_stored
from awqkit.quant.grid import GroupQuantized

PACKED_FORMATS = ("awq", "compressed-tensors", "gguf")


def check_packable(format: str, linears: dict[str, nn.Linear], group_size: int) -> None:
    """Neither packed format holds a short last group: refuse, naming group sizes that work."""
    widths = sorted({linear.in_features for linear in linears.values()})
    if any(width % group_size for width in widths):
        common = math.gcd(*widths)
        working = [2**k for k in range(4, 12) if common % 2**k == 0]
        raise ValueError(
            f"format {format} needs the group size to divide every input size ({', '.join(map(str, widths))}); "
            f"{group_size} does not. Group sizes that do: {', '.join(map(str, working)) or 'none'} "
            "(or use --format fake, which keeps a short last group)"
        )
    if format == "awq":
        odd = sorted({linear.out_features for linear in linears.values() if linear.out_features % 8})
        if odd:
            raise ValueError(f"format awq packs 8 output columns per int32; output sizes {odd} are not multiples of 8")


def block_tensors(
    prefix: str, state: dict[str, torch.Tensor], quantized: dict[str, GroupQuantized], format: str
) -> dict[str, torch.Tensor]:
    """A block's tensors as ``format`` stores them, named ``prefix`` + name, sorted by name.

    fake keeps every float weight; a packed format replaces each quantized linear's weight by its
    own tensors, their scales in the dtype that weight was stored in.
    """
    if format not in ("fake", *PACKED_FORMATS):
        raise ValueError(f"unknown format {format!r}; choose one of fake, {', '.join(PACKED_FORMATS)}")
    tensors = dict(state)
    if format != "fake":
        for name, q in quantized.items():
            dtype = tensors.pop(f"{name}.weight").dtype
            if format == "gguf":  # the blocks; the file is assembled from them when the run is done
                tensors[f"{name}.gguf"] = gguf_blocks(q)
                continue
            packed = awq_gemm_tensors(q) if format == "awq" else pack_quantized_tensors(q, dtype)
            tensors.update({f"{name}.{key}": value for key, value in packed.items()})
    return {prefix + name: tensors[name].contiguous() for name in sorted(tensors)}


def stored_block_tensors(
    block: nn.Module, prefix: str, state: dict[str, torch.Tensor], quantized: dict[str, GroupQuantized], format: str
) -> dict[str, torch.Tensor]:
    """``block_tensors``, with fake's float weights in the form the checkpoint stores them (experts
    fused again, GPT-2's Conv1D transposed back), so transformers loads them as it loaded the input;
    packed formats keep one tensor set per linear."""
    tensors = block_tensors(prefix, state, quantized, format)
    return as_stored(block, prefix, tensors) if format == "fake" else tensors


def write_quantization_config(
    folder: Path,
    format: str,
    bits: int,
    group_size: int,
    ignore: list[str],
    symmetric: bool = False,
    targets: tuple[str, ...] = ("Linear",),
) -> None:
    """Add ``format``'s quantization_config to the config.json already in ``folder``."""
    if format == "awq":
        config_path = folder / "config.json"
        config: dict[str, Any] = json.loads(config_path.read_text())
        config["quantization_config"] = awq_quantization_config(bits, group_size)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    elif format == "compressed-tensors":
        write_pack_quantized_config(str(folder), bits, group_size, ignore, symmetric, targets)
    else:
        raise ValueError(f"unknown packed format {format!r}; choose one of {', '.join(PACKED_FORMATS)}")
