"""AutoAWQ's "GEMM" layout (quant_method awq, version gemm, zero_point true).

Per linear with weight [out, in] and groups of G input columns:
- ``qweight`` int32 [in, out / 8]: the integers transposed, eight output columns per int32, the
  column ``8j + AWQ_ORDER[i]`` in bits 4i..4i+3 (the interleaving AutoAWQ's kernels expect);
- ``qzeros`` int32 [in / G, out / 8]: the raw zero points, packed the same way;
- ``scales`` fp16 [in / G, out]; the weight is (q - zero) * scale.
transformers and vLLM read ``quantization_config`` from config.json.
"""

from __future__ import annotations

import torch

from awqkit.quant.grid import GroupQuantized

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Integers in 0..15 [rows, cols] -> int32 [rows, cols / 8] in the AWQ interleaved order.

    Built in int32 one nibble slot at a time (an int64 copy of a 13B model's block is 2.5 GB):
    the slot at bits 28..31 wraps into the sign bit, which is the two's complement AWQ stores.
    """
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"AWQ packs 8 columns per int32; {cols} is not a multiple of 8")
    if values.min() < 0 or values.max() > 15:
        raise ValueError("AWQ packing holds 4-bit values (0..15) only")
    grouped = values.reshape(rows, cols // PACK, PACK)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int32)
    for slot, column in enumerate(AWQ_ORDER):
        packed.bitwise_or_(grouped[:, :, column].to(torch.int32).bitwise_left_shift_(4 * slot))
    return packed


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_awq``: int32 [rows, n] -> integers [rows, 8 n] (int64)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[:, :, None] >> shifts) & 0xF
    unordered = torch.empty_like(nibbles)
    unordered[:, :, list(AWQ_ORDER)] = nibbles
    return unordered.reshape(packed.shape[0], -1)


def awq_gemm_tensors(quantized: GroupQuantized) -> dict[str, torch.Tensor]:
    """qweight, qzeros and scales of one linear (names relative to the linear)."""
    if quantized.bits != 4:
        raise ValueError(f"AWQ GEMM holds 4-bit weights only, got {quantized.bits}")
    return {
        "qweight": pack_awq(quantized.q.T.contiguous()),
        "qzeros": pack_awq(quantized.zero.T.to(torch.int64).contiguous()),
        "scales": quantized.scale.T.to(torch.float16).contiguous(),
    }


def awq_gemm_weight(tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """The float weight [out, in] that AWQ GEMM tensors stand for."""
    q = unpack_awq(tensors["qweight"])  # [in, out]
    zeros = unpack_awq(tensors["qzeros"]).repeat_interleave(group_size, dim=0)
    scales = tensors["scales"].float().repeat_interleave(group_size, dim=0)
    return ((q - zeros) * scales).T.contiguous()


def awq_quantization_config(bits: int, group_size: int) -> dict:
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": None,
    }
