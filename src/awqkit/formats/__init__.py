"""How a quantized model is stored: packed formats that transformers and vLLM load.

The fake-quant format (float weights) is ``checkpoint.save_quantized``; the packed formats here
replace each quantized linear's weight by its format's tensors and add quantization_config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from awqkit.formats.awq_gemm import awq_gemm_tensors, awq_quantization_config
from awqkit.formats.pack_quantized import pack_quantized_tensors, write_pack_quantized_config
from awqkit.quant import GroupQuantized

PACKED_FORMATS = ("awq", "compressed-tensors")


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


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied duplicates (lm_head = embeddings) dropped, as save_pretrained does."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    return state


def packed_state_dict(model: nn.Module, quantized: dict[str, GroupQuantized], format: str) -> dict[str, torch.Tensor]:
    state = _unique_state(model)
    for name, q in quantized.items():
        del state[f"{name}.weight"]
        if format == "awq":
            tensors = awq_gemm_tensors(q)
        else:
            tensors = pack_quantized_tensors(q, model.dtype)
        state.update({f"{name}.{key}": value.contiguous() for key, value in tensors.items()})
    return state


def write_packed(folder: Path, model: nn.Module, quantized: dict[str, GroupQuantized], format: str) -> None:
    """Weights and config.json of a packed checkpoint, into an existing (temporary) folder."""
    if format not in PACKED_FORMATS:
        raise ValueError(f"unknown packed format {format!r}; choose one of {', '.join(PACKED_FORMATS)}")
    first = next(iter(quantized.values()))
    save_file(packed_state_dict(model, quantized, format), str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if format == "awq":
        config_path = folder / "config.json"
        config: dict[str, Any] = json.loads(config_path.read_text())
        config["quantization_config"] = awq_quantization_config(first.bits, first.group_size)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        quantized_names = set(quantized)
        ignore = sorted(
            name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized_names
        )
        write_pack_quantized_config(str(folder), first.bits, first.group_size, ignore)
