"""compressed-tensors "pack-quantized" (int, group strategy), written by the library.

The library stores signed integers: q in 0..2^b-1 with zero point z becomes q - 2^(b-1) with zero
point z - 2^(b-1), the same q - z. A symmetric grid (z = 2^(b-1)) stores no zero point. Scales are
kept in the model's dtype, as llm-compressor does.
"""

from __future__ import annotations

import torch

from awqkit.quant.grid import GroupQuantized


def scheme(bits: int, group_size: int, symmetric: bool = False, targets: tuple[str, ...] = ("Linear",)):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    return QuantizationScheme(targets=list(targets), weights=weights)


def pack_quantized_tensors(quantized: GroupQuantized, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight_packed, weight_scale, weight_zero_point and weight_shape of one linear."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    offset = 2 ** (quantized.bits - 1)
    scale = quantized.scale.to(scale_dtype)
    zero = quantized.zero.to(torch.int64)
    # The library re-derives the integers as round(w / scale + zero): hand it w = (q - zero) * scale
    # computed from the stored scale, so that division gives back q exactly.
    q_minus_zero = quantized.q.to(torch.int64) - zero.repeat_interleave(quantized.group_size, dim=1)
    weight = q_minus_zero.float() * scale.float().repeat_interleave(quantized.group_size, dim=1)
    state = {"weight": weight, "weight_scale": scale}
    if not quantized.symmetric:
        state["weight_zero_point"] = (zero - offset).to(torch.int8)
    args = scheme(quantized.bits, quantized.group_size, quantized.symmetric)
    return dict(PackedQuantizationCompressor.compress(state, args))


def write_pack_quantized_config(
    folder: str,
    bits: int,
    group_size: int,
    ignore: list[str],
    symmetric: bool = False,
    targets: tuple[str, ...] = ("Linear",),
) -> None:
    """Add quantization_config to the config.json in ``folder``, through the library. ``targets``:
    the class names of the quantized linears (loaders match by class name: Falcon's FalconLinear)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(
        config_groups={"group_0": scheme(bits, group_size, symmetric, targets)},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    ModelCompressor(quantization_config=config).update_config(folder)
