"""Where a causal LM keeps its decoder blocks and which linears inside them get quantized.

Found generically (the largest ModuleList of identical blocks under the decoder), not from a
hand-written table per model type; tested on Llama, Mistral, Qwen2, Qwen3 and Gemma3.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED = "decoder-only models whose blocks use nn.Linear (Llama, Mistral, Qwen2, Qwen3, Gemma3)"


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class DecoderLayout:
    decoder: nn.Module  # embeds tokens and runs the blocks (``model.model`` for Llama)
    blocks: nn.ModuleList
    blocks_name: str  # qualified name of ``blocks`` inside the full model


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder(model: nn.Module) -> DecoderLayout:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", model)
    stacks = [
        (name, module)
        for name, module in decoder.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and _num_params(module) > 0
    ]
    if not stacks:
        raise UnsupportedModelError(f"no decoder blocks found in {type(model).__name__}; supported: {SUPPORTED}")
    name, blocks = max(stacks, key=lambda item: _num_params(item[1]))
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    _check_block(blocks[0], type(model).__name__)
    return DecoderLayout(decoder, blocks, ".".join(p for p in (prefix, name) if p))


def _check_block(block: nn.Module, model_name: str) -> None:
    kinds = {type(m).__name__ for m in block.modules()}
    if "Conv1D" in kinds:
        raise UnsupportedModelError(
            f"{model_name} stores its projections as GPT-2-style Conv1D, which awqkit does not quantize; "
            f"supported: {SUPPORTED}"
        )
    if not any(isinstance(m, nn.Linear) for m in block.modules()):
        raise UnsupportedModelError(f"{model_name} has no nn.Linear in its decoder blocks; supported: {SUPPORTED}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of one block, by name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
