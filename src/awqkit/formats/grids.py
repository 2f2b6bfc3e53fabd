"""Which integer grids each format holds, checked before any work (the config imports this, so it
imports nothing heavy)."""

from __future__ import annotations

# GGUF blocks hold 32 weights; (bits, symmetric) -> the GGML type holding that grid.
GGUF_GROUP_SIZE = 32
GGUF_TYPES = {(4, False): "Q4_1", (4, True): "Q4_0", (8, True): "Q8_0"}


def check_gguf(bits: int, group_size: int, symmetric: bool) -> None:
    """Refuse, in one line naming what works, a grid that no GGUF block type holds."""
    works = "--group-size 32 with --bits 4 (Q4_1), --bits 4 --symmetric (Q4_0) or --bits 8 --symmetric (Q8_0)"
    if group_size != GGUF_GROUP_SIZE or (bits, symmetric) not in GGUF_TYPES:
        grid = f"bits {bits}, group size {group_size}, {'symmetric' if symmetric else 'asymmetric'}"
        raise ValueError(
            f"format gguf holds groups of 32 only as Q4_1, Q4_0 or Q8_0; {grid} is none of them: use {works}"
        )


def check_format_grid(format: str, bits: int, group_size: int, symmetric: bool) -> None:
    """Refuse a grid ``format`` cannot store."""
    if format == "awq" and bits != 4:
        raise ValueError(f"format awq (AutoAWQ GEMM) holds 4-bit weights only, got bits {bits}")
    if format == "awq" and symmetric:
        raise ValueError(
            "format awq (AutoAWQ GEMM) is asymmetric: drop --symmetric, or use --format compressed-tensors, "
            "which holds symmetric grids"
        )
    if format == "gguf":
        check_gguf(bits, group_size, symmetric)
